"""Docs that cannot rot: every `main.py` command line in the markdown files names an existing
config file, config argument and `--config.` fields, and every file they link exists.

The commands are parsed and their configs built by main.py's own flag parsing (as a run
starts), never run. Read: README.md and every other markdown file of the repository.
"""
import contextlib
import io
import os
import re
import shlex

import pytest
from absl import flags

import main
from conftest import REPO

SKIPPED_FOLDERS = {".venv", ".git", ".pytest_cache", "runs", "workdirs", "build"}
PLACEHOLDER = re.compile(r"[<>{}$*]|\.\.\.")  # configs/<job>.py, $BITS, ...
ALTERNATIVE = "\u2016"  # stands for a table's escaped `\|` (smoke\|budget) while parsing


def markdown_files() -> list[str]:
  """Every markdown file of the repository (paths relative to it), sorted."""
  found = []
  for root, folders, files in os.walk(REPO):
    folders[:] = sorted(f for f in folders if f not in SKIPPED_FOLDERS and not
                        f.startswith("."))
    found += [os.path.relpath(os.path.join(root, f), REPO) for f in files if f.endswith(".md")]
  return sorted(found)


def read(path: str) -> str:
  with open(os.path.join(REPO, path)) as f:
    return f.read()


# --- command lines -------------------------------------------------------------------------
def command_lines(text: str) -> list[tuple[int, str]]:
  """(line number, the command from `main.py` on) of each main.py command line in markdown
  `text`: a line of a fenced code block (backslash continuations joined) or an inline code
  span (which may run over several lines)."""
  found = []
  for block in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S):
    first = text.count("\n", 0, block.start(1)) + 1
    lines, i = block[1].split("\n"), 0
    while i < len(lines):
      start, line = first + i, lines[i]
      while line.endswith("\\") and i + 1 < len(lines):  # a continued shell line
        i += 1
        line = line[:-1] + " " + lines[i].strip()
      i += 1
      match = re.search(r"\bmain\.py\b", line)
      if match:
        found.append((start, line[match.start():]))
  prose = re.sub(r"^```.*?^```", lambda m: "\n" * m[0].count("\n"), text, flags=re.M | re.S)
  for span in re.finditer(r"`([^`]+)`", prose):
    match = re.search(r"\bmain\.py\b", span[1])
    if match:
      found.append((prose.count("\n", 0, span.start(1) + match.start()) + 1,
                    span[1][match.start():].replace("\n", " ")))
  return sorted(found)


def tokens(command: str) -> list[str]:
  """The command's words up to a shell operator or comment; optional groups `[...]` opened."""
  command = command.replace("\\|", ALTERNATIVE)
  try:
    words = shlex.split(command, comments=True)
  except ValueError:  # an unbalanced quote (a command inside a quoted string)
    words = [w.strip("\"'") for w in command.split("#", 1)[0].split()]
  kept = []
  for word in words[1:]:
    if word in ("&&", "||", ";", "|") or word.startswith((">", "2>", "|")):
      break
    kept.append(word.strip("[]") if word.startswith("[") else word)
  return kept


def config_variants(value: str) -> list[str] | None:
  """`configs/X.py:arg` (or `configs/X.py[:a|b]`, `configs/X.py:a|b`) -> each config it
  names; None for a placeholder (`configs/<job>.py`)."""
  match = re.fullmatch(r"(configs/[\w/]+\.py)(\[:(.*)\]|:(.*))?", value)
  if match is None or PLACEHOLDER.search(value):
    return None
  path, optional, args = match[1], match[3], match[4]
  if optional is not None:
    return [path] + [f"{path}:{a}" for a in optional.split(ALTERNATIVE)]
  if args is not None:
    return [f"{path}:{a}" for a in args.split(ALTERNATIVE)]
  return [path]


def parsed_commands() -> list[tuple[str, list[str]]]:
  """(where, argv for main.py) of every command line in the docs that names a config."""
  commands = []
  for path in markdown_files():
    for line, command in command_lines(read(path)):
      words = tokens(command)
      configs = [w.split("=", 1)[1] for w in words if w.startswith("--config=")]
      overrides = []
      for i, word in enumerate(words):
        if word.startswith("--config."):
          has_value = "=" in word or i + 1 == len(words) or words[i + 1].startswith("--")
          overrides.append(word if has_value else f"{word}={words[i + 1]}")
      for config in configs:
        for variant in config_variants(config) or []:
          commands.append((f"{path}:{line}: main.py --config={variant} {' '.join(overrides)}",
                           [f"--config={os.path.join(REPO, variant)}",
                            "--workdir=/nonexistent", *overrides]))
  return commands


def parse_error(argv: list[str]) -> str | None:
  """main.py's `error:` line for this command line (config file, argument and fields), or
  None if it parses: the config is built and every override set, nothing run."""
  argv = ["main.py", *argv]
  flag_values = flags.FlagValues()
  main.define_flags(flag_values, argv)
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    try:
      main.parse_flags(argv, flag_values)
      flag_values.config  # noqa: B018 (the config is built when first read)
    except SystemExit:
      return stderr.getvalue().strip() or "exit"
  return None


def test_the_command_line_parser_finds_what_a_reader_would_run():
  text = ("Run `.venv/bin/python main.py --config=configs/ptq.py:w4a4 --workdir=DIR "
          "[--config.calibration_data=real]` or\n"
          "```\n.venv/bin/python main.py --config=configs/pipeline.py:smoke \\\n"
          "    --workdir=DIR --config.seed 3  # a comment\n```\n"
          "| job | `main.py --config=configs/teacher.py[:cpu\\|smoke] --workdir=DIR` |\n")
  found = [(line, tokens(command)) for line, command in command_lines(text)]
  assert found == [
      (1, ["--config=configs/ptq.py:w4a4", "--workdir=DIR", "--config.calibration_data=real"]),
      (3, ["--config=configs/pipeline.py:smoke", "--workdir=DIR", "--config.seed", "3"]),
      (6, ["--config=configs/teacher.py[:cpu\u2016smoke]", "--workdir=DIR"])]
  assert config_variants("configs/teacher.py[:cpu\u2016smoke]") == [
      "configs/teacher.py", "configs/teacher.py:cpu", "configs/teacher.py:smoke"]
  assert config_variants("configs/<job>.py[:arg]") is None


@pytest.mark.parametrize("argv, problem", [
    (["--config=configs/pipeline.py:smoke", "--config.finetune_stage.lerning_rate=0.1"],
     "lerning_rate"),
    (["--config=configs/pipeline.py:smok"], "smok"),
    (["--config=configs/finetune.py:w4a4", "--config.num_epochs=N"], "num_epochs"),
])
def test_a_mistyped_command_line_is_caught(argv, problem):
  argv[0] = argv[0].replace("configs/", os.path.join(REPO, "configs") + "/")
  error = parse_error([*argv, "--workdir=/nonexistent"])
  assert error is not None and problem in error, error


def test_every_command_line_in_the_docs_names_an_existing_config_and_fields():
  commands = parsed_commands()
  assert len(commands) >= 5, [where for where, _ in commands]  # the README's, at least
  errors = [f"{where}\n    {error}" for where, argv in commands
            if (error := parse_error(argv))]
  assert not errors, "\n".join(errors)


# --- linked files --------------------------------------------------------------------------
TOP_LEVEL = sorted(e for e in os.listdir(REPO) if not e.startswith(".") and
                   e not in SKIPPED_FOLDERS)


def linked_paths(text: str) -> list[str]:
  """The files a markdown text points to: link targets that are not URLs or anchors, and
  backticked paths under one of the repository's top-level entries (configs/x.py,
  experiments/y/z.json; a `:suffix` or `::test` dropped); placeholders left out."""
  paths = [t.split("#", 1)[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)
           if not re.match(r"[a-z]+:|#", t)]
  for code in re.findall(r"`([^`\n]+)`", text):
    for word in code.split():
      word = word.split("::", 1)[0].split(":", 1)[0].rstrip(".,;)")
      if word.split("/", 1)[0] in TOP_LEVEL and "/" in word:
        paths.append(word)
  return [p for p in paths if p and not PLACEHOLDER.search(p) and "DIR" not in p]


def test_the_link_finder_reads_links_and_repository_paths():
  text = ("See [usage](docs/usage.md#jobs), [flax](https://github.com/google/flax), [top](#a),"
          " `tests/test_docs.py::test_x`, `configs/pipeline.py:smoke`, `DIR/export/x`, "
          "`experiments/<name>/README.md` and `python -m dfqf_jax.tools.integer_check`.")
  assert linked_paths(text) == ["docs/usage.md", "tests/test_docs.py", "configs/pipeline.py"]


def test_every_file_the_docs_link_exists():
  missing = []
  for path in markdown_files():
    for target in linked_paths(read(path)):
      beside = os.path.normpath(os.path.join(os.path.dirname(path), target))
      if not any(os.path.exists(os.path.join(REPO, p)) for p in (beside, target)):
        missing.append(f"{path}: {target}")
  assert not missing, "\n".join(missing)
