# What an installed pptk contains: every package and the shipped configs; and no package-index host in the tree.
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Package indexes and registries, spelled in pieces so that this file does not name them either.
REGISTRY_HOSTS = [
    "pypi" + ".org",
    "files." + "pythonhosted.org",
    "download." + "pytorch.org",
    "anaconda" + ".org",
    "repo." + "anaconda.com",
    "registry." + "npmjs.org",
    "crates" + ".io",
    "proxy." + "golang.org",
    "rubygems" + ".org",
    "repo1." + "maven.org",
]


def test_every_package_directory_is_listed_for_setuptools():
    """pyproject.toml lists packages by name (for the ds_configs mapping): a new pptk/ sub-package must be added."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pptk").rglob("__init__.py")}
    missing = sorted(on_disk - set(setuptools["packages"]))
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    assert setuptools["package-dir"] == {"pptk.ds_configs": "ds_configs"}
    assert "pptk.ds_configs" in setuptools["packages"]
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["pptk.ds_configs"] == ["*.json"]
    assert (ROOT / "ds_configs" / "__init__.py").is_file()


def test_the_package_data_is_the_repository_folder():
    from importlib import resources

    shipped = {p.name for p in resources.files("pptk.ds_configs").iterdir() if p.name.endswith(".json")}
    assert shipped == {p.name for p in (ROOT / "ds_configs").glob("*.json")} and len(shipped) == 3


def test_no_package_index_host_is_named_in_the_repository():
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    named = []
    for name in files:
        path = ROOT / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8").lower()
        except UnicodeDecodeError:
            continue
        named += [f"{name}: {host}" for host in REGISTRY_HOSTS if host in text]
    assert not named, named
