"""JIT builds use one ninja (the interpreter's own) whatever PATH a shell or launcher passes down, so a second
start finds the first one's build up to date instead of recompiling."""
import os
import shutil
import subprocess
import sys

import pytest

from megatrain.testing import ROOT

VENV_NINJA = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "ninja")
needs_venv_ninja = pytest.mark.skipif(not os.access(VENV_NINJA, os.X_OK), reason="no ninja next to this interpreter")


def _run_in_megatrain(code: str, *, path: str, cwd: str = ROOT, extra_env: dict | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env.update(PATH=path, PYTHONPATH=ROOT, **(extra_env or {}))
    proc = subprocess.run([sys.executable, "-c", "import megatrain.toolchain as t\nt.pin_jit_toolchain()\n" + code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _system_first_path() -> str:
    # a shell that never activated the venv: the system's ninja (if any) is what it would find
    return os.pathsep.join(["/usr/local/bin", "/usr/bin", "/bin"])


@needs_venv_ninja
def test_the_interpreters_ninja_goes_first_whatever_the_path():
    out = _run_in_megatrain("import shutil; print(shutil.which('ninja'))", path=_system_first_path())
    assert out.strip() == VENV_NINJA


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="not running in a venv")
def test_the_build_cache_defaults_to_the_venv_and_keeps_a_users_choice(tmp_path):
    code = "import os; print(os.environ['TORCH_EXTENSIONS_DIR'])"
    assert _run_in_megatrain(code, path=os.environ["PATH"]).strip() == os.path.join(sys.prefix, "torch_extensions")
    mine = str(tmp_path / "ext")
    assert _run_in_megatrain(code, path=os.environ["PATH"], extra_env={"TORCH_EXTENSIONS_DIR": mine}).strip() == mine


@needs_venv_ninja
def test_a_second_build_from_another_path_is_up_to_date(tmp_path):
    # two ninja versions read each other's .ninja_log as "command line changed" and rebuild; with the pin,
    # a build started from an activated venv and one from a bare shell run the same ninja
    (tmp_path / "in.txt").write_text("x")
    (tmp_path / "build.ninja").write_text("rule cp\n  command = cp $in $out\nbuild out.txt: cp in.txt\n")
    build = "import subprocess; print(subprocess.run(['ninja', '-d', 'explain'], capture_output=True, text=True).stdout)"
    venv_path = os.pathsep.join([os.path.dirname(VENV_NINJA), _system_first_path()])
    first = _run_in_megatrain(build, path=venv_path, cwd=str(tmp_path))
    assert "cp in.txt out.txt" in first
    stamp = os.stat(tmp_path / "out.txt").st_mtime_ns
    second = _run_in_megatrain(build, path=_system_first_path(), cwd=str(tmp_path))
    assert "no work to do" in second and os.stat(tmp_path / "out.txt").st_mtime_ns == stamp, second
    if shutil.which("ninja", path=_system_first_path()):  # the failure this guards against is real here
        plain = subprocess.run(["ninja", "-n", "-d", "explain"], cwd=tmp_path, capture_output=True, text=True,
                               env={"PATH": _system_first_path()})
        system_version = subprocess.run(["ninja", "--version"], capture_output=True, text=True,
                                        env={"PATH": _system_first_path()}).stdout.strip()
        venv_version = subprocess.run([VENV_NINJA, "--version"], capture_output=True, text=True).stdout.strip()
        if system_version.split(".")[:2] != venv_version.split(".")[:2]:
            assert "no work to do" not in plain.stdout
