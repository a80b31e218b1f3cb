"""plugins/, adapters/ and envs/ map into tokenmem.* in regular (wheel) installs as well as editable ones."""

import subprocess
import sys
import zipfile
from pathlib import Path

import tokenmem.adapters.text
import tokenmem.plugins.sink

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_top_level_folders():
    assert Path(tokenmem.plugins.sink.__file__).resolve() == ROOT / "plugins" / "sink.py"
    assert Path(tokenmem.adapters.text.__file__).resolve() == ROOT / "adapters" / "text.py"


def test_wheel_contains_and_imports_the_mapped_packages(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("tokenmem-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("tokenmem/memory.py", "tokenmem/kernels/reference.py", "tokenmem/plugins/sink.py",
                 "tokenmem/plugins/h2o.py", "tokenmem/adapters/text.py", "tokenmem/envs/__init__.py",
                 "tokenmem/kernels/colmass.cpp", "tokenmem/zoo/models/shapes-llava-video/model.safetensors",
                 "tokenmem/bank/store.py", "tokenmem/kernels/triton_backend.py", "tokenmem/adapters/base.py",
                 "tokenmem/zoo/models/stdlib-llama/model.safetensors", "tokenmem/zoo/scorers/language/scorer.json",
                 "tokenmem/zoo/data/lm_tasks/retrieval-eval.jsonl", "tokenmem/envs/models/hopper-medium-dt/config.json"):
        assert name in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = (
        "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
        f"sys.path.insert(0, {str(target)!r}); "
        "import tokenmem, tokenmem.plugins.sink, tokenmem.adapters.text; "
        "from tokenmem.bank import Bank; from tokenmem.plugins.namm import NAMM; NAMM.pretrained('language'); "
        "print(tokenmem.plugins.sink.__file__); print(sorted(tokenmem.list_evictors()))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.splitlines()[0].startswith(str(target))
    assert "sink" in out
