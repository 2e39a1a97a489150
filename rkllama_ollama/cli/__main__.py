"""`python -m rkllama_ollama.cli`: the `rkllama-ollama` command."""

import sys

from rkllama_ollama.cli.commands import main

sys.exit(main())
