"""The agent's file watcher on real inotify, over a directory laid out like a Nomad client's data dir."""

from __future__ import annotations

import errno
import os
import queue
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from shepard_lib.agent.inotify import PyInotifyWatcher, WatchError, WatchLimitReached
from shepard_lib.agent.watcher import ChangeEvent, FileWatcher, TaskKey, is_ignored
from shepard_lib.clock import Clock

CLOCK = Clock(20.0)
SETTLE = 2.0  # cluster seconds: 0.1 s real
KEY = TaskKey("a1", "server")


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    base = tmp_path / "alloc" / KEY.alloc_id
    for sub in ("alloc/logs", "alloc/data", "server/local", "server/secrets"):
        (base / sub).mkdir(parents=True)
    (base / "server" / "local" / "app.conf").write_text("v1")
    (base / "server" / "local" / "shepard.tpl").write_text("t1")
    return tmp_path


@pytest.fixture
def events(layout: Path) -> Iterator[queue.Queue[ChangeEvent]]:
    got: queue.Queue[ChangeEvent] = queue.Queue()
    watcher = FileWatcher(layout, got.put, PyInotifyWatcher, clock=CLOCK, settle_time=SETTLE)
    watcher.watch(KEY)
    yield got
    watcher.close()


def task_dir(layout: Path) -> Path:
    return layout / "alloc" / KEY.alloc_id / "server"


def replace(path: Path, content: str) -> None:
    tmp = path.parent / "123456"
    tmp.write_text(content)
    os.replace(tmp, path)


def next_event(got: queue.Queue[ChangeEvent]) -> ChangeEvent:
    return got.get(timeout=CLOCK.real(20 * SETTLE) + 5)


def test_a_burst_of_writes_is_one_event_naming_the_changed_files(layout: Path) -> None:
    # A wide settle_time (3 s real): the three writes fall in one window even on a busy machine.
    got: queue.Queue[ChangeEvent] = queue.Queue()
    settle = 60.0
    watcher = FileWatcher(layout, got.put, PyInotifyWatcher, clock=CLOCK, settle_time=settle)
    try:
        watcher.watch(KEY)
        replace(task_dir(layout) / "local" / "app.conf", "v2")
        (task_dir(layout).parent / "alloc" / "data" / "flags").write_text("on")
        replace(task_dir(layout) / "local" / "app.conf", "v3")
        event = got.get(timeout=CLOCK.real(20 * settle) + 5)
        assert event.key == KEY
        assert event.files == ("alloc/data/flags", "server/local/app.conf")
        CLOCK.sleep(2 * settle)  # a write reported on its own would have come by now
        assert got.empty(), got.get()
    finally:
        watcher.close()


def test_identical_rewrites_logs_trigger_and_temp_files_are_no_change(
    layout: Path, events: queue.Queue[ChangeEvent]
) -> None:
    replace(task_dir(layout) / "local" / "app.conf", "v1")  # identical content
    (task_dir(layout).parent / "alloc" / "logs" / "server.stdout.0").write_text("log line")
    replace(task_dir(layout) / "local" / "shepard.tpl", "t2")
    (task_dir(layout) / "local" / "app.conf.swp").write_text("editor")
    (task_dir(layout) / "secrets" / "token").write_text("not watched without watch_secrets")
    # A real change afterwards is the next (and only) event: nothing before it counted.
    (task_dir(layout) / "local" / "new.conf").write_text("x")
    assert next_event(events).files == ("server/local/new.conf",)


def test_a_new_subdirectory_is_followed(layout: Path, events: queue.Queue[ChangeEvent]) -> None:
    sub = task_dir(layout) / "local" / "conf.d"
    sub.mkdir()
    (sub / "extra.conf").write_text("x")
    assert next_event(events).files == ("server/local/conf.d/extra.conf",)
    (sub / "extra.conf").write_text("y")
    assert next_event(events).files == ("server/local/conf.d/extra.conf",)


@pytest.mark.parametrize(
    ("name", "ignored"),
    [
        (".app.conf.x1", True),
        ("app.conf~", True),
        ("a.swp", True),
        ("4913", True),
        ("123456", True),
        ("app.conf", False),
        ("v2.yaml", False),
    ],
)
def test_temporary_and_editor_names_are_ignored(name: str, ignored: bool) -> None:
    assert is_ignored(name) is ignored


def test_secrets_are_watched_with_watch_secrets(layout: Path) -> None:
    got: queue.Queue[ChangeEvent] = queue.Queue()
    watcher = FileWatcher(
        layout, got.put, PyInotifyWatcher, clock=CLOCK, settle_time=SETTLE, watch_secrets=True
    )
    try:
        watcher.watch(KEY)
        (task_dir(layout) / "secrets" / "token").write_text("s2")
        assert next_event(got).files == ("server/secrets/token",)
    finally:
        watcher.close()


def test_a_task_whose_directory_is_removed_is_dropped_without_an_event(layout: Path) -> None:
    got: queue.Queue[ChangeEvent] = queue.Queue()
    gone: queue.Queue[TaskKey] = queue.Queue()
    watcher = FileWatcher(
        layout, got.put, PyInotifyWatcher, on_gone=gone.put, clock=CLOCK, settle_time=SETTLE
    )
    try:
        watcher.watch(KEY)
        shutil.rmtree(layout / "alloc" / KEY.alloc_id)  # Nomad collected the allocation
        assert gone.get(timeout=CLOCK.real(20 * SETTLE) + 5) == KEY
        assert KEY not in watcher.watched()
        CLOCK.sleep(4 * SETTLE)
        assert got.empty(), "a removed task is not restarted"
    finally:
        watcher.close()


def test_a_half_written_file_is_no_event_until_it_is_closed(
    layout: Path, events: queue.Queue[ChangeEvent]
) -> None:
    app = task_dir(layout) / "local" / "app.conf"
    with app.open("wb") as half:  # truncated, then written in two parts, as a slow writer would
        half.write(b"first half, ")
        half.flush()
        # A change of another file settles and is reported meanwhile: it alone.
        (task_dir(layout) / "local" / "other.conf").write_text("x")
        assert next_event(events).files == ("server/local/other.conf",)
        half.write(b"second half")
    event = next_event(events)
    assert event.files == ("server/local/app.conf",)
    assert app.read_bytes() == b"first half, second half"


@pytest.mark.parametrize(("code", "error"), [(errno.ENOSPC, WatchLimitReached), (errno.EACCES, WatchError)])
def test_the_kernels_enospc_is_the_watch_limit_and_other_errors_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, error: type[WatchError]
) -> None:
    dirs = PyInotifyWatcher(lambda event: None)
    try:
        # What inotify_add_watch(2) does when the kernel refuses: returns -1 and sets errno.
        wrapper = dirs._wm._inotify_wrapper
        monkeypatch.setattr(wrapper, "_inotify_add_watch", lambda fd, path, mask: -1)
        monkeypatch.setattr(wrapper, "_get_errno", lambda: code)
        with pytest.raises(error) as raised:
            dirs.add(tmp_path)
        assert (type(raised.value) is WatchLimitReached) is (code == errno.ENOSPC)
        assert str(tmp_path) in str(raised.value)
        assert dirs.count() == 0
    finally:
        dirs.close()
