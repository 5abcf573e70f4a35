"""Install (or remove) the torchvision CPU import shim into the running interpreter's site-packages.

Usage: ``python tools/install_tv_shim.py [--uninstall]``. Prints what it wrote. See tv_cpu_shim.py.
"""
import argparse
import shutil
import site
import sys
from pathlib import Path

MODULE = "_invertlab_tv_shim"


def site_packages() -> Path:
    """Return the first site-packages directory of this interpreter (the venv's, in a venv)."""
    return Path(site.getsitepackages()[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uninstall", action="store_true", help="remove the shim")
    args = parser.parse_args(argv)
    sp = site_packages()
    module_path, pth_path = sp / f"{MODULE}.py", sp / f"{MODULE}.pth"
    if args.uninstall:
        for p in (module_path, pth_path):
            p.unlink(missing_ok=True)
        print(f"removed torchvision shim from {sp}")
        return 0
    shutil.copyfile(Path(__file__).with_name("tv_cpu_shim.py"), module_path)
    pth_path.write_text(f"import {MODULE}\n")
    print(f"installed torchvision shim: {module_path} + {pth_path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
