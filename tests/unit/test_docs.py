"""The config reference in docs/ is generated from the schema; a field added without regenerating fails."""
from megatrain.config.docs import config_reference


def test_config_reference_is_current():
    with open("docs/config.md", encoding="utf-8") as f:
        assert f.read().strip() == config_reference().strip(), "run: megatrain config-docs > docs/config.md"
