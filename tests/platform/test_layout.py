"""The root folder `platform/` must never shadow the standard library module."""

import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO_ROOT


def test_python_c_at_repo_root():
    out = subprocess.run([sys.executable, "-c", "import platform; print(platform.system())"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in {"Linux", "Darwin", "Windows"}


def test_python_m_pytest_at_repo_root(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text(textwrap.dedent("""
        import platform
        import kosmos_g.platform.storage

        def test_stdlib_platform():
            assert platform.system()
            assert platform.python_version().startswith("3.")
            assert kosmos_g.platform.storage.parse("s3://b/k").bucket == "b"
    """))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout


def test_platform_has_no_init_file():
    assert not (REPO_ROOT / "platform" / "__init__.py").exists()


def test_ray_task_with_repo_working_dir(ray_local, tmp_path):
    """A driver elsewhere ships the repo as its job's working_dir: Ray's own
    workers call platform.system() at start-up and must get the stdlib."""
    gcs_address = ray_local.get_runtime_context().gcs_address
    driver = textwrap.dedent(f"""
        import ray
        ray.init(address={gcs_address!r}, runtime_env={{"working_dir": {str(REPO_ROOT)!r},
                 "excludes": [".venv", ".kosmos", ".git"]}})

        @ray.remote
        def probe():
            import os, platform
            import kosmos_g.platform.storage
            return platform.system(), os.path.isdir("platform")

        print("RESULT", *ray.get(probe.remote(), timeout=300))
    """)
    out = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "RESULT Linux True" in out.stdout or "RESULT Darwin True" in out.stdout
