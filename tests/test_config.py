import pytest

from ps1mpi.infra.config import RecipeError, load_recipe


def test_defaults_and_overrides(tmp_path):
    campaign = tmp_path / "campaign.toml"
    campaign.write_text("[runtime]\nretry_cap = 5\nlog_level = 'DEBUG'\n")
    recipe = load_recipe([campaign], ["runtime.unit_timeout_s=12"])
    assert recipe.get("runtime.retry_cap") == 5
    assert recipe.get("runtime.log_level") == "DEBUG"
    assert recipe.get("runtime.unit_timeout_s") == 12.0
    assert load_recipe().get("runtime.retry_cap") == 2  # defaults untouched


def test_unknown_key_is_named_with_its_source(tmp_path):
    campaign = tmp_path / "c.toml"
    campaign.write_text("[runtime]\nretry_cpa = 5\n")
    with pytest.raises(RecipeError, match=r"c\.toml: unknown recipe key 'runtime\.retry_cpa' \(did you mean 'runtime\.retry_cap'\?\)"):
        load_recipe([campaign])
    with pytest.raises(RecipeError, match="unknown recipe key 'nosuchsection'"):
        load_recipe(overrides=["nosuchsection.x=1"])


def test_wrong_type_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="'runtime.retry_cap' must be a number"):
        load_recipe(overrides=["runtime.retry_cap='many'"])
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe([tmp_path / "missing.toml"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[runtime\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe([bad])
