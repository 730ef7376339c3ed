#!/bin/sh
# Run here before a GPU call: rebuilds this project's wheel into .whl/ (the
# GPU machine installs it with the other carried wheels) from a copy of the
# working tree (so no stale build/ folder leaks old files into it), and
# copies the team's reference recipe into .bench/ (../shared does not travel).
set -e
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
cp -r pyproject.toml README.md kubetune operator trainer "$tmp"/ 2>/dev/null || cp -r pyproject.toml kubetune operator trainer "$tmp"/
find "$tmp" -name __pycache__ -prune -exec rm -rf {} +
rm -f .whl/kubetune-*.whl
uv build -q --wheel -o "$PWD/.whl" "$tmp"
rm -rf "$tmp"
mkdir -p .bench
cp ../shared/bench/reference_recipe.py .bench/
# The commit the wheel was built from (bench/run.py records it; "+changes" when the tree had
# uncommitted changes), since the copy of the tree on the GPU machine can carry older git metadata.
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- kubetune operator trainer bench || echo +changes)" > .bench/commit
du -sh .whl .bench
