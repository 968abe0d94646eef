"""Where a record says it came from: DFQF_COMMIT names the tree when git's HEAD is another
commit or there is no git (a copied working tree on an accelerator); otherwise git's own
answer stands."""
import subprocess

from cli import REPO
from dfqf_jax import provenance


def test_dfqf_commit_wins_over_another_head_and_agrees_with_its_own(monkeypatch):
  git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
  head = git.stdout.strip() if git.returncode == 0 else None
  monkeypatch.delenv("DFQF_COMMIT", raising=False)
  commit, dirty = provenance.git_state()
  if head is None:
    assert (commit, dirty) == ("unknown", None)
  else:
    assert commit == head and isinstance(dirty, bool)
  monkeypatch.setenv("DFQF_COMMIT", "f" * 40)
  assert provenance.git_state() == ("f" * 40, None)  # dirty: not known for that tree
  if head is not None:
    monkeypatch.setenv("DFQF_COMMIT", head)
    assert provenance.git_state() == (head, dirty)


def test_a_record_names_the_commit_its_process_started_with(monkeypatch, tmp_path):
  """A run of hours can see HEAD move on (a checkout updated under it): its record names the
  code the process imported."""
  from dfqf_jax import report
  monkeypatch.setattr(provenance, "git_state", lambda: ("b" * 40, False))
  assert provenance.commit() == "b" * 40
  record = report.record_run(str(tmp_path / "record.json"), str(tmp_path), {}, 1.0)
  assert record["commit"] == report.COMMIT_AT_START != "b" * 40
