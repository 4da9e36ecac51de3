"""The package's entry points: `import prime_trl` stays light (TRL, Transformers and PEFT load on first use of
`PRIMEConfig` / `PRIMETrainer`), and the lazy names behave as imported ones."""

import subprocess
import sys
from pathlib import Path

import prime_trl
import prime_trl.trainer

HEAVY = ("trl", "transformers", "peft", "prime_trl.trainer.prime_config", "prime_trl.trainer.prime_trainer")


def test_light_imports_do_not_load_trl():
    code = (
        "import sys, prime_trl, prime_trl.trainer, prime_trl.algo.core, prime_trl.rewards, prime_trl.data; "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]", f"import prime_trl loaded {loaded.strip()}"


def test_lazy_names_import_list_and_fail_like_module_attributes():
    from prime_trl import PRIMEConfig, PRIMETrainer
    from prime_trl.trainer.prime_config import PRIMEConfig as DeclaredConfig
    from prime_trl.trainer.prime_trainer import PRIMETrainer as DeclaredTrainer

    assert PRIMEConfig is DeclaredConfig and PRIMETrainer is DeclaredTrainer
    assert prime_trl.PRIMETrainer is prime_trl.trainer.PRIMETrainer is DeclaredTrainer
    for package in (prime_trl, prime_trl.trainer):
        assert set(package.__all__) <= set(dir(package)), package.__name__
    namespace = {}
    exec("from prime_trl import *", namespace)
    assert namespace["PRIMEConfig"] is DeclaredConfig and namespace["__version__"] == prime_trl.__version__
    try:
        prime_trl.PRIMETrainers  # noqa: B018
    except AttributeError as error:
        assert "PRIMETrainers" in str(error)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
