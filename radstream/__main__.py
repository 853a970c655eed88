"""``python -m radstream ...`` is the console script; ``accelerate launch -m radstream pretrain ...`` runs a
training stage on every process Accelerate starts."""

import sys

from radstream.cli import main

sys.exit(main())
