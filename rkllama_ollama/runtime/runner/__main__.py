"""`python -m rkllama_ollama.runtime.runner <events-fd>`: the runner child process."""

import sys

from rkllama_ollama.runtime.runner.child import child_main

sys.exit(child_main(sys.argv[1:]))
