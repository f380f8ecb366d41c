import subprocess
import sys


def test_import_touches_neither_tensorrt_nor_cuda():
    code = (
        "import sys, mixrank.compress, mixrank.exporter, mixrank.engines, torch\n"
        "assert 'tensorrt' not in sys.modules, 'tensorrt imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_public_api():
    import mixrank.compress as compress

    for name in ("compress_model", "CompressConfig", "apply_factors", "save_factors",
                 "load_factors", "FactoredLinear", "MixrankError"):
        assert hasattr(compress, name), name
