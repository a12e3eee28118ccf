"""resnet_jax.files: a file is replaced whole or not at all."""

import errno
import json
import os
import stat

import pytest

from resnet_jax import files


def test_a_complete_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    (tmp_path / "r.json").write_text("old")
    files.write_json(tmp_path / "r.json", {"acc": 0.9})
    assert json.loads((tmp_path / "r.json").read_text()) == {"acc": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"good")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_write(tmp_path / "w.bin") as f:
            f.write(b"half of the new")
            raise KeyboardInterrupt  # Ctrl-C mid-write
    assert (tmp_path / "w.bin").read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["w.bin"]


def test_a_written_file_has_the_mode_open_would_give(tmp_path):
    # mkstemp's files are private (0600): results.json and curves.png would be unreadable to others.
    files.write_json(tmp_path / "r.json", {})
    (tmp_path / "plain").write_text("")
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)


def test_a_target_that_is_not_a_regular_file_is_refused_not_replaced(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # stands for /dev/null or /dev/full, which a rename (as root) would replace
    with pytest.raises(OSError, match="not a regular file"):
        with files.atomic_write(fifo) as f:
            f.write(b"x")
    assert stat.S_ISFIFO(fifo.stat().st_mode) and sorted(tmp_path.iterdir()) == [fifo]



@pytest.mark.parametrize("hard_links", [True, False], ids=["hard-links", "no-hard-links"])
def test_without_replace_a_file_written_meanwhile_is_kept(tmp_path, monkeypatch, hard_links):
    # --export-torch: another run's model, written between this run's last look and its rename,
    # was replaced. Without hard links (FAT, some shares) a last look before os.replace is what is left.
    if not hard_links:
        def no_link(src, dst, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    target = tmp_path / "m.pt"
    with pytest.raises(FileExistsError, match="another program wrote a file there meanwhile, which is kept"):
        with files.atomic_write(target, replace=False) as f:
            f.write(b"this run's model")
            target.write_bytes(b"the other run's model")  # meanwhile
    assert target.read_bytes() == b"the other run's model" and sorted(tmp_path.iterdir()) == [target]
    target.unlink()
    with files.atomic_write(target, replace=False) as f:  # no file there: written, as with replace
        f.write(b"this run's model")
    assert target.read_bytes() == b"this run's model" and sorted(tmp_path.iterdir()) == [target]
    (tmp_path / "plain").write_text("")
    assert stat.S_IMODE(os.stat(target).st_mode) == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)

@pytest.mark.parametrize("failure", ["windows-fat", "fusepy-rofs", "einval"])
def test_without_replace_any_refused_hard_link_falls_back_to_a_look_and_a_rename(tmp_path, monkeypatch, failure):
    # Windows on a FAT or exFAT drive: CreateHardLinkW fails with ERROR_INVALID_FUNCTION (1), or
    # ERROR_NOT_SUPPORTED (50) on some shares, which Python gives errno EINVAL; fusepy's default
    # link() answers EROFS. The export failed ("not written: Incorrect function") after the training.
    def no_link(src, dst, **kwargs):
        err = OSError(errno.EROFS if failure == "fusepy-rofs" else errno.EINVAL, "Incorrect function")
        if failure == "windows-fat":
            err.winerror = 1
        raise err

    monkeypatch.setattr(os, "link", no_link)
    target = tmp_path / "m.pt"
    with files.atomic_write(target, replace=False) as f:
        f.write(b"this run's model")
    assert target.read_bytes() == b"this run's model" and sorted(tmp_path.iterdir()) == [target]
    with pytest.raises(FileExistsError, match="another program wrote a file there meanwhile"):
        with files.atomic_write(target, replace=False) as f:  # and the look still keeps a file there
            f.write(b"a second model")
    assert target.read_bytes() == b"this run's model" and sorted(tmp_path.iterdir()) == [target]


def test_without_replace_a_link_made_but_reported_as_refused_is_the_file_written(tmp_path, monkeypatch):
    # NFS: link() is not idempotent; a retransmitted request whose first reply was lost answers EEXIST
    # although the link was made (link(2), open(2) O_EXCL). The file there is then this run's own.
    real_link = os.link

    def lost_reply(src, dst, **kwargs):
        real_link(src, dst, **kwargs)
        raise FileExistsError(errno.EEXIST, "File exists")

    monkeypatch.setattr(os, "link", lost_reply)
    target = tmp_path / "m.pt"
    with files.atomic_write(target, replace=False) as f:
        f.write(b"this run's model")
    assert target.read_bytes() == b"this run's model" and sorted(tmp_path.iterdir()) == [target]
    assert os.stat(target).st_nlink == 1


def test_a_held_lock_keeps_a_second_holder_out_and_is_gone_after(tmp_path):
    lock = tmp_path / ".lock"
    with files.held(lock):
        assert f"pid {os.getpid()} on " in lock.read_text()
        with pytest.raises(files.Busy) as busy, files.held(lock):
            pass
        assert busy.value.holder.startswith(f"pid {os.getpid()} on ")
        assert lock.exists()  # the refused second holder left the first one's file alone
    assert not lock.exists()
    with files.held(lock):  # free again
        pass


def test_a_lock_whose_holder_was_killed_is_free(tmp_path):
    import subprocess
    import sys
    import time

    lock = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from resnet_jax import files\n"
                               f"with files.held({str(lock)!r}):\n    print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(files.Busy), files.held(lock):
            pass
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert lock.exists()  # a kill leaves the file; the kernel's lock went with the process
    start = time.monotonic()
    with files.held(lock):
        assert time.monotonic() - start < 1


def test_where_fcntl_is_missing_the_lock_is_filelocks(tmp_path, monkeypatch):
    # On Windows (no fcntl) held() locked nothing: two runs in one folder mixed their checkpoints.
    # Here filelock's lock is flock's too; what is tested is that held() takes it and keeps out
    # another process, waits when asked, and nests.
    import subprocess
    import sys
    import threading
    import time

    import filelock  # noqa: F401  (imported with fcntl, as on Windows with msvcrt)

    lock = tmp_path / "run.lock"
    no_fcntl = "import sys, time, filelock; sys.modules['fcntl'] = None; from resnet_jax import files\n"
    holder = subprocess.Popen([sys.executable, "-c", no_fcntl + f"with files.held({str(lock)!r}):\n"
                               "    print('held', flush=True); sys.stdin.readline()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    monkeypatch.setitem(sys.modules, "fcntl", None)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(files.Busy, match="in use by another program"), files.held(lock):
            pass
        waited = []
        threading.Timer(1.0, lambda: (holder.stdin.write("\n"), holder.stdin.flush())).start()
        start = time.monotonic()
        with files.held(lock, on_wait=waited.append):
            assert waited == [""] and time.monotonic() - start >= 0.9
            with files.held(lock, reentrant=True):
                pass
            with pytest.raises(files.Busy):  # this process's other threads too
                with files.held(lock):
                    pass
        assert os.path.realpath(lock) not in files._held_here
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        holder.stdin.close()


@pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="flock's lock file (POSIX)")
def test_a_lock_path_that_is_a_link_or_not_a_file_is_refused_and_nothing_is_written(tmp_path):
    # The holder writes its name into the lock file: through a link planted in a run folder or
    # data dir (one downloaded, or in a shared /tmp) it emptied the file linked (a ~/.bashrc).
    victim = tmp_path / "bashrc"
    victim.write_text("alias ll='ls -l'\n")
    (tmp_path / "soft.lock").symlink_to(victim)
    (tmp_path / "dangling.lock").symlink_to(tmp_path / "made_through_the_link")
    os.link(victim, tmp_path / "hard.lock")
    os.mkfifo(tmp_path / "fifo.lock")
    for name, says in [("soft.lock", "is a symbolic link, not a lock file: remove it"),
                       ("dangling.lock", "is a symbolic link, not a lock file"),
                       ("hard.lock", "is a hard link to another file, not a lock file: remove it"),
                       ("fifo.lock", "is not a regular file, not a lock file")]:
        with pytest.raises(files.NotALockFile, match=says):
            with files.held(tmp_path / name):
                pass
    assert victim.read_text() == "alias ll='ls -l'\n" and not (tmp_path / "made_through_the_link").exists()
    assert (tmp_path / "soft.lock").is_symlink() and (tmp_path / "hard.lock").exists()  # left for the user to see


def test_json_safe_writes_non_finite_numbers_as_null(tmp_path):
    # json.dumps wrote "test_loss": NaN, which JSON readers (jq, JSON.parse) refuse.
    doc = {"test_loss": float("nan"), "acc": 0.5, "per_class": [float("inf"), -float("inf"), 1.0], "n": 3, "s": "NaN"}
    want = {"test_loss": None, "acc": 0.5, "per_class": [None, None, 1.0], "n": 3, "s": "NaN"}
    assert json.loads(json.dumps(files.json_safe(doc), allow_nan=False)) == want
    files.write_json(tmp_path / "r.json", doc)
    assert json.loads((tmp_path / "r.json").read_text()) == want


def test_a_reentrant_hold_keeps_the_lock_until_the_last_hold_ends_in_any_order(tmp_path):
    # Released first, the first hold closed the lock's file while a nested one was still open:
    # another process could then take the folder, a second writer.
    lock = tmp_path / "run.lock"
    outer, inner = files.held(lock), files.held(lock, reentrant=True)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    with pytest.raises(files.Busy):  # what another process (or a second descriptor) meets
        with files.held(lock):
            pass
    assert lock.is_file()
    inner.__exit__(None, None, None)
    assert not lock.exists()
    with files.held(lock):  # free again
        pass
    with pytest.raises(ValueError):  # a hold ended by an exception is released too
        with files.held(lock), files.held(lock, reentrant=True):
            raise ValueError
    # (Only this lock: other tests in this process may hold theirs, a Checkpoints left open.)
    assert not lock.exists() and os.path.realpath(lock) not in files._held_here


def test_a_folder_where_no_file_can_be_made_says_so_not_that_it_is_missing(tmp_path, monkeypatch):
    # /proc is such a folder: creating a file in it fails with ENOENT, and "No such file or
    # directory" alone read as if the folder itself were missing.
    import errno
    import tempfile
    from pathlib import Path

    from resnet_jax.errors import UserError, check_writable_dir

    def enoent(dir):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(tempfile, "TemporaryFile", enoent)
    with pytest.raises(UserError, match=r"is not a writable directory: no file can be created in it \(No such file"):
        check_writable_dir(tmp_path, "--export-torch's folder")
    if os.path.isdir("/proc") and os.geteuid() == 0:  # the real thing, where this test runs as root (CI)
        monkeypatch.undo()
        with pytest.raises(UserError, match="no file can be created in it"):
            check_writable_dir(Path("/proc"), "--export-torch's folder")
