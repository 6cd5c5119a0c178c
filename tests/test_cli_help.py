"""`minirlhf --help` lists every stage without importing any trainer; a stage imports only its own."""

import subprocess
import sys

from minirlhf import cli


def modules_loaded_by(argv):
    code = ("import sys\nfrom minirlhf import cli\n"
            f"try:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('loaded:', *sorted(m for m in sys.modules if m.startswith('minirlhf.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1].split()[1:]


def test_help_lists_every_stage_and_imports_no_trainer():
    loaded = modules_loaded_by(["--help"])
    assert "minirlhf.cli" in loaded
    assert not any(m.startswith("minirlhf.train.") for m in loaded), loaded


def test_a_stages_help_imports_its_trainer_and_no_other():
    loaded = modules_loaded_by(["dpo", "--help"])
    assert "minirlhf.train.dpo" in loaded and "minirlhf.train.demo" not in loaded


def test_every_stage_names_a_config_class_and_a_run_function():
    for name, (config_cls, run, help_text) in cli._stages().items():
        assert config_cls.__dataclass_fields__ and callable(run) and help_text, name
