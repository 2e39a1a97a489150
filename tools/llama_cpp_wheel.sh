#!/bin/sh
# Build llama-cpp-python once per machine and per CMAKE_ARGS, then install it into a venv.
#
#   tools/llama_cpp_wheel.sh PYTHON VERSION
#
# pip's own wheel cache keys on the package version only, not on CMAKE_ARGS, so a cached wheel built
# without the multimodal library would be reused silently. The wheel is kept instead in
#   $RKLLAMA_WHEEL_CACHE (default ~/.cache/rkllama-ollama/wheels)/llama-cpp-python-VERSION-PYTAG-SHA/
# where SHA is the first 12 hex digits of sha256(CMAKE_ARGS). It is built into a temporary folder and
# renamed into place, so an interrupted or concurrent build never leaves a half-written wheel there.
set -eu

python=$1
version=$2
cache=${RKLLAMA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rkllama-ollama/wheels}
pytag=$("$python" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
sha=$(printf '%s' "${CMAKE_ARGS:-}" | sha256sum | cut -c1-12)
dir=$cache/llama-cpp-python-$version-$pytag-$sha

if ! ls "$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
	mkdir -p "$cache"
	tmp=$(mktemp -d "$cache/.build-XXXXXX")
	chmod 755 "$tmp"
	trap 'rm -rf "$tmp"' EXIT
	trap 'exit 1' HUP INT TERM
	echo "building llama-cpp-python $version (CMAKE_ARGS='${CMAKE_ARGS:-}') into $dir; this takes minutes"
	start=$(date +%s)
	"$python" -m pip wheel -q --no-deps --no-cache-dir --wheel-dir "$tmp" "llama-cpp-python==$version"
	printf '%s\n' "${CMAKE_ARGS:-}" >"$tmp/CMAKE_ARGS"
	# Another build may have finished first: keep its wheel, ours goes away with the trap.
	mv -T "$tmp" "$dir" 2>/dev/null || true
	echo "llama-cpp-python built in $(($(date +%s) - start)) s"
fi

wheel=$(ls "$dir"/llama_cpp_python-*.whl | head -n 1)
"$python" -m pip install -q --force-reinstall --no-deps "$wheel"
# Its dependencies (numpy, typing-extensions, diskcache, jinja2) come from the index as usual.
"$python" -m pip install -q "$wheel"
