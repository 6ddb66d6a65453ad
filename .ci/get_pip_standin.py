"""Stand-in for the pip bootstrap script ansible-test downloads (get-pip.py), which CI cannot reach.

ansible-test runs ``python get_pip.py [pip options] PACKAGES...`` in each fresh virtual environment it
builds; this does the same from the interpreter's own ensurepip and the configured package index.
"""

import subprocess
import sys

args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
subprocess.run([sys.executable, "-m", "ensurepip", "--default-pip"], check=True)
subprocess.run([sys.executable, "-m", "pip", "install", "--upgrade", *args], check=True)
