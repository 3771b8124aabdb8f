"""Inbox entries are regular files or nothing: a symlink is refused (moved, as a link, to .failed/
with the reason; its target never read), and a FIFO or folder named like a meta file is left alone
with one warning, however many rescans see it. The real daemon, as a subprocess."""

from __future__ import annotations

import json
import os

import pytest

from tests.harness import ECHO, DaemonProcess, daemon_config
from tests.stages_for_tests import ENV

pytestmark = pytest.mark.timeout(180)


def test_links_are_refused_and_odd_entries_left_alone(tmp_path):
    secret = tmp_path / "secret.jsonl"  # a readable meta file the link points at
    secret.write_text(json.dumps({"id": "leaked", "text": "root:x:0:0"}) + "\n")
    config = daemon_config(tmp_path, [ECHO], rescan_s=0.2, settle_ms=100)
    with DaemonProcess(config, env=ENV) as daemon:
        inbox = daemon.inbox
        os.mkfifo(inbox / "pipe.jsonl")  # opening it to read would block the reader forever
        (inbox / "folder.csv").mkdir()
        # `ln -s /etc/passwd x; mv x inbox/passwd.csv`, and a link to a real meta file
        os.symlink("/etc/passwd", tmp_path / "x")
        os.replace(tmp_path / "x", inbox / "passwd.csv")
        os.symlink(secret, inbox / "linked.jsonl")

        daemon.drop_text("first.jsonl", json.dumps({"id": "a"}) + "\n")
        assert daemon.wait_for_job("first")["state"] == "done"
        daemon.drop_text("second.jsonl", json.dumps({"id": "b"}) + "\n")  # several rescans later
        assert daemon.wait_for_job("second")["state"] == "done"
        log = daemon.log()
        assert [r["id"] for r in daemon.results("first")] == ["a"]

    failed = inbox / ".failed"
    for name, target in (("passwd.csv", "/etc/passwd"), ("linked.jsonl", str(secret))):
        moved = failed / name
        assert moved.is_symlink() and os.readlink(moved) == target  # the link itself moved, nothing copied
        reason = json.loads((failed / f"{name}.error.json").read_text())
        assert reason["file"] == name
        assert reason["error"].startswith(f"{name}: is a symbolic link (to {target}); inbox entries must be regular")
        assert f"{name}: is a symbolic link" in log
        stem = name.split(".")[0]
        assert not (daemon.outbox / f"{stem}.jsonl").exists()
        assert not (daemon.outbox / f"{stem}.errors.jsonl").exists()
    for path in daemon.outbox.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert "root:x:0:0" not in text and "leaked" not in text, path
    assert secret.read_text().startswith('{"id": "leaked"')  # the target is untouched

    # Left alone, reported once each across many rescans.
    assert (inbox / "pipe.jsonl").exists() and (inbox / "folder.csv").is_dir()
    for name in ("pipe.jsonl", "folder.csv"):
        assert log.count(f"{inbox / name} is not a regular file") == 1, log


def test_a_link_swapped_in_after_the_scan_is_not_followed(tmp_path):
    """The scan saw a regular file, but a link took its place before the claim: here a link planted
    in inbox/.work/ (where a claim moves an entry, and where a restart resumes from). The reader
    refuses it at the open (O_NOFOLLOW), the job fails with the reason, the link's target is never
    read, and a real job beside it goes on."""
    secret = tmp_path / "secret.jsonl"
    secret.write_text(json.dumps({"id": "leaked", "text": "root:x:0:0"}) + "\n")
    config = daemon_config(tmp_path, [ECHO], rescan_s=0.2, settle_ms=100)
    work = tmp_path / "inbox" / ".work"
    work.mkdir(parents=True)
    os.symlink(secret, work / "swapped.jsonl")
    with DaemonProcess(config, env=ENV) as daemon:
        daemon.drop_text("real.jsonl", json.dumps({"id": "a"}) + "\n")
        assert daemon.wait_for_job("real")["state"] == "done"
        assert daemon.wait_for_job("swapped")["state"] == "failed"
        assert [r["id"] for r in daemon.results("real")] == ["a"]
    failed = daemon.inbox / ".failed"
    reason = json.loads((failed / "swapped.jsonl.error.json").read_text())
    assert reason["error"].startswith(f"swapped.jsonl: is a symbolic link (to {secret}); meta files must be regular")
    assert (failed / "swapped.jsonl").is_symlink()
    for path in daemon.outbox.rglob("*"):
        if path.is_file():
            assert "leaked" not in path.read_text(errors="replace"), path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_the_reader_opens_neither_a_link_nor_a_fifo(tmp_path, fmt):
    """Whatever took the claimed file's place: a link is refused without reading its target, and
    a FIFO is refused without blocking the open (nothing writes to it here: a plain open would
    hang this test until its timeout)."""
    from daemon.io.readers import UnreadableFile, read_rows

    target = tmp_path / "target"
    target.write_text('{"id": "leaked"}\n')
    os.symlink(target, tmp_path / f"link.{fmt}")
    with pytest.raises(UnreadableFile, match=rf"^link\.{fmt}: is a symbolic link \(to {target}\)"):
        list(read_rows(tmp_path / f"link.{fmt}", fmt, "video"))
    os.mkfifo(tmp_path / f"fifo.{fmt}")
    with pytest.raises(UnreadableFile, match=rf"^fifo\.{fmt}: is not a regular file"):
        list(read_rows(tmp_path / f"fifo.{fmt}", fmt, "video"))
