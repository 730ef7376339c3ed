# `python -m kubetune ...` is what `accelerate launch -m kubetune train ...` runs in the pods.
from kubetune.cli import main

main()
