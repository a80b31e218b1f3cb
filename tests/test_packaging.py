"""plugins/, adapters/ and envs/ map into tokenmem.* in editable installs, and the wheel works outside the repository:
built from a clean copy of the source, installed into a fresh virtual environment in a temporary folder, where
``tokenmem demo --quick`` runs on the shipped models, scorer, task data and native kernel source from the wheel."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import tokenmem.adapters.text
import tokenmem.plugins.sink

ROOT = Path(__file__).resolve().parents[1]

# what a `pip install tokenmem` user must get, and what stays in the repository (pyproject's exclude-package-data)
SHIPPED = ("tokenmem/memory.py", "tokenmem/compat.py", "tokenmem/kernels/reference.py", "tokenmem/plugins/sink.py",
           "tokenmem/plugins/h2o.py", "tokenmem/adapters/text.py", "tokenmem/adapters/base.py",
           "tokenmem/envs/__init__.py", "tokenmem/bank/store.py", "tokenmem/kernels/triton_backend.py",
           "tokenmem/kernels/colmass.cpp",
           "tokenmem/zoo/models/stdlib-llama/model.safetensors", "tokenmem/zoo/models/stdlib-llama/tokenizer.json",
           "tokenmem/zoo/models/stdlib-llama/training.json",
           "tokenmem/zoo/models/shapes-llava-video/model.safetensors",
           "tokenmem/zoo/models/shapes-llava-video/video_preprocessor_config.json",
           "tokenmem/zoo/models/shapes-qwen2vl-video/model.safetensors",
           "tokenmem/zoo/models/shapes-qwen2vl-video/video_preprocessor_config.json",
           "tokenmem/adapters/qwen2vl.py", "tokenmem/adapters/qwen2vl_frames.py",
           "tokenmem/zoo/scorers/language/scorer.json", "tokenmem/zoo/scorers/language/scorer.safetensors",
           "tokenmem/zoo/data/lm_tasks/retrieval-eval.jsonl", "tokenmem/zoo/data/lm_tasks/code-completion-eval.jsonl",
           "tokenmem/zoo/data/namm_fitness/retrieval.jsonl",
           "tokenmem/envs/models/hopper-medium-dt/config.json", "tokenmem/envs/models/hopper-medium-dt/model.safetensors")
LEFT_OUT = ("training_log.jsonl", "loss_curve.png", "corpus_manifest.json", "fitness_curve.png", "evolve.log",
            "evolution.json", "/behaviour/")


def test_editable_install_maps_top_level_folders():
    assert Path(tokenmem.plugins.sink.__file__).resolve() == ROOT / "plugins" / "sink.py"
    assert Path(tokenmem.adapters.text.__file__).resolve() == ROOT / "adapters" / "text.py"


def _clean_source(dest: Path) -> Path:
    """The checkout without environments, build leftovers and caches (a stale build/ would leak into a wheel)."""
    skip = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                  ".hypothesis", "runs", "*.so")
    shutil.copytree(ROOT, dest, ignore=skip, symlinks=True)
    return dest


def _dependencies_dir(dest: Path) -> Path:
    """This environment's installed packages, symlinked, except tokenmem itself: the fresh environment sees its
    dependencies on disk (no download, no copy of torch) and installs tokenmem only from the wheel."""
    dest.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("tokenmem", "__editable__", "_tokenmem")) or name.endswith(".pth"):
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


def test_the_wheel_works_in_a_fresh_environment_outside_the_repository(tmp_path):
    work = tmp_path / "outside"  # not the checkout
    work.mkdir()
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(_clean_source(tmp_path / "src"))], check=True, capture_output=True)
    wheel = next(wheels.glob("tokenmem-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in SHIPPED if name not in names]
    assert not missing, missing
    leaked = sorted(name for name in names if any(part in name for part in LEFT_OUT))
    assert not leaked, leaked
    print(f"wheel: {wheel.name}, {wheel.stat().st_size / 2**20:.1f} MiB, {len(names)} files")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "_dependencies.pth").write_text(str(_dependencies_dir(tmp_path / "deps")) + "\n")
    # pip from the deps folder; --no-index: the wheel's requirements (tokenmem[demo]) must be met as installed
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-index", "--disable-pip-version-check", "-q",
                              f"{wheel}[demo]"], capture_output=True, text=True, cwd=work)
    assert install.returncode == 0, install.stdout + install.stderr
    assert not list(site.glob("__editable__*"))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(TOKENMEM_CACHE=str(tmp_path / "cache"), TOKENMEM_NATIVE="require", PATH=f"{venv / 'bin'}:{env['PATH']}")
    # the installed package, its mapped folders and shipped files, and the native kernel built from the wheel's
    # colmass.cpp into the fresh TOKENMEM_CACHE (TOKENMEM_NATIVE=require: a failed build raises)
    where = subprocess.run([str(python), "-c", "import tokenmem, tokenmem.plugins.sink, tokenmem.adapters.text, "
                            "tokenmem.zoo as z; from tokenmem.kernels import native; assert native.load(); "
                            "print(tokenmem.__file__); print(tokenmem.plugins.sink.__file__); "
                            "print(z.stdlib_lm_path()); print(native.__file__)"],
                           check=True, capture_output=True, text=True, cwd=work, env=env).stdout.split()
    assert len(where) == 4 and all(Path(p).is_relative_to(site) for p in where), where
    assert list((tmp_path / "cache" / "kernels").glob("colmass-*.so"))

    demo = subprocess.run([str(venv / "bin" / "tokenmem"), "demo", "--quick"], capture_output=True, text=True,
                          cwd=work, env=env, timeout=1800)
    out, err = demo.stdout, demo.stderr
    assert demo.returncode == 0, out + err
    assert f"model: {site}" in out  # the shipped language model, from the installed wheel
    for table in ("| full | all |", "| h2o | 25% |", "| sink + memory bank | 25% |", "| namm (language scorer) | 25% |",
                  "| full history | all |", "| namm (language scorer) | 60 tokens |"):
        assert table in out, out
    assert "[4/4] done" in out and "skipped" not in out
    assert "FutureWarning" not in out + err and "Loading weights" not in out + err, out + err
