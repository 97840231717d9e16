import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kosmos_g.platform import storage


@pytest.fixture(params=["s3", "file", "plain"])
def root(request, s3_prefix, tmp_path):
    if request.param == "s3":
        return s3_prefix
    if request.param == "file":
        return f"file://{tmp_path}"
    return str(tmp_path)


def test_round_trip_list_exists_delete(root):
    a, b = storage.join(root, "a.bin"), storage.join(root, "sub", "b.txt")
    storage.write_bytes(a, b"\x00\x01payload")
    storage.write_text(b, "hello")
    assert storage.read_bytes(a) == b"\x00\x01payload"
    assert storage.read_text(b) == "hello"
    assert storage.exists(a) and not storage.exists(storage.join(root, "nope"))
    listed = storage.list_uris(root)
    assert [u.rsplit("/", 1)[-1] for u in listed] == ["a.bin", "b.txt"]
    storage.delete(a)
    assert not storage.exists(a)
    assert storage.delete_prefix(root) == 1
    assert storage.list_uris(root) == []


def test_missing_object_names_the_uri(root):
    missing = storage.join(root, "missing", "thing.bin")
    with pytest.raises(storage.StorageNotFound, match="missing/thing.bin"):
        storage.read_bytes(missing)
    with pytest.raises(FileNotFoundError):
        storage.delete(missing, missing_ok=False)


def test_failed_write_keeps_previous_content(root):
    target = storage.join(root, "model.safetensors")
    storage.write_bytes(target, b"version-1")
    with pytest.raises(RuntimeError):
        with storage.open_write(target) as stream:
            stream.write(b"half of version-2")
            raise RuntimeError("crash mid-write")
    assert storage.read_bytes(target) == b"version-1"
    storage.write_bytes(target, b"version-2")
    assert storage.read_bytes(target) == b"version-2"
    # No temporary leftovers become visible.
    assert [u.rsplit("/", 1)[-1] for u in storage.list_uris(root)] == ["model.safetensors"]


def test_reader_never_sees_partial_multipart_object(s3_prefix):
    """A 20 MiB object goes up in several parts; concurrent readers see either
    nothing or the whole object."""
    target = f"{s3_prefix}/big.bin"
    payload = os.urandom(20 * 1024 * 1024 + 123)
    seen_sizes = set()
    done = threading.Event()

    def reader():
        while not done.is_set():
            try:
                seen_sizes.add(len(storage.read_bytes(target)))
            except storage.StorageNotFound:
                seen_sizes.add(0)

    thread = threading.Thread(target=reader)
    thread.start()
    storage.write_bytes(target, payload)
    done.set()
    thread.join()
    assert seen_sizes <= {0, len(payload)}
    assert storage.read_bytes(target) == payload
    head = storage.s3_client().head_object(Bucket=storage.parse(target).bucket, Key=storage.parse(target).path)
    assert "-" in head["ETag"], "expected a multipart upload"


def test_wrong_secret_is_refused(s3_prefix, monkeypatch):
    storage.write_bytes(f"{s3_prefix}/secret.txt", b"x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(storage.StorageError, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        storage.read_bytes(f"{s3_prefix}/secret.txt")


def test_pyarrow_filesystem_reads_and_writes_parquet(s3_prefix):
    fs, path = storage.pyarrow_filesystem(f"{s3_prefix}/table.parquet")
    table = pa.table({"caption": ["a cat", "a dog"], "n": [1, 2]})
    pq.write_table(table, path, filesystem=fs)
    assert storage.exists(f"{s3_prefix}/table.parquet")
    assert pq.read_table(path, filesystem=fs).to_pylist() == table.to_pylist()


def test_local_dir_fetches_s3_tree_into_cache(s3_prefix, tmp_path):
    storage.write_text(f"{s3_prefix}/weights/config.json", "{}")
    storage.write_bytes(f"{s3_prefix}/weights/unet/model.bin", b"w" * 100)
    local = storage.local_dir(f"{s3_prefix}/weights", cache_root=tmp_path)
    assert (local / "config.json").read_text() == "{}"
    assert (local / "unet" / "model.bin").stat().st_size == 100
    assert storage.local_dir(f"{s3_prefix}/weights", cache_root=tmp_path) == local
    with pytest.raises(storage.StorageNotFound):
        storage.local_dir(f"{s3_prefix}/no-such-weights", cache_root=tmp_path)


def test_cached_copies_follow_the_stored_bytes_not_the_path(s3_prefix, tmp_path):
    """A fresh stack writes other bytes under a path an earlier one used (its buckets start empty,
    its job names repeat): the cache must serve what is stored now, for trees and single files."""
    storage.write_bytes(f"{s3_prefix}/weights/model.bin", b"first stack")
    storage.write_bytes(f"{s3_prefix}/merges.txt", b"first merges")
    first_dir = storage.local_dir(f"{s3_prefix}/weights", cache_root=tmp_path)
    first_file = storage.local_file(f"{s3_prefix}/merges.txt", cache_root=tmp_path)
    assert first_file.name == "merges.txt" and first_file.read_bytes() == b"first merges"

    storage.write_bytes(f"{s3_prefix}/weights/model.bin", b"second stack")
    storage.write_bytes(f"{s3_prefix}/merges.txt", b"second merges")
    assert (storage.local_dir(f"{s3_prefix}/weights", cache_root=tmp_path) / "model.bin").read_bytes() == b"second stack"
    assert storage.local_file(f"{s3_prefix}/merges.txt", cache_root=tmp_path).read_bytes() == b"second merges"
    storage.write_bytes(f"{s3_prefix}/weights/extra.json", b"{}")  # a file added to the tree counts too
    assert (storage.local_dir(f"{s3_prefix}/weights", cache_root=tmp_path) / "extra.json").is_file()
    assert (first_dir / "model.bin").read_bytes() == b"first stack"  # a copy in use is never rewritten
    with pytest.raises(storage.StorageNotFound):
        storage.local_file(f"{s3_prefix}/no-such-merges.txt", cache_root=tmp_path)


def test_a_second_download_never_replaces_a_copy_being_read(s3_prefix, tmp_path, monkeypatch):
    """Two Train workers on one node fetch the same init bundle: the one that finishes second must
    not delete the first one's copy while it is read (a stage-2 worker's `torch.load` failed with
    "PytorchStreamReader failed reading file data/95" when it did)."""
    uri = f"{s3_prefix}/bundle"
    storage.write_bytes(f"{uri}/model.safetensors", b"m" * 1000)
    real_download = storage.download_dir
    opened = {}

    def download_while_another_finishes(source, staging):
        if not opened:  # this caller saw no cached copy; another one completes meanwhile
            opened["started"] = True
            first = storage.local_dir(uri, cache_root=tmp_path)
            opened["path"] = first / "model.safetensors"
            opened["inode"] = opened["path"].stat().st_ino
        return real_download(source, staging)

    monkeypatch.setattr(storage, "download_dir", download_while_another_finishes)
    second = storage.local_dir(uri, cache_root=tmp_path)
    assert second / "model.safetensors" == opened["path"]
    # The first copy is still the one in place: same file, still readable, nothing left staged.
    assert opened["path"].stat().st_ino == opened["inode"]
    assert opened["path"].read_bytes() == b"m" * 1000
    assert not list(tmp_path.rglob(".download-*"))


def test_a_cache_fill_that_fails_leaves_nothing_that_passes_for_a_copy(tmp_path):
    """`fill_once` (behind every cached s3 tree and registered model): a download that dies leaves
    no folder behind, the next call fills it, a complete copy is never filled again, and a folder
    without the marker (a copy made before the marker existed) is replaced by a marked one."""
    target = tmp_path / "registry" / "kosmos-g" / "1-run"

    def dies_halfway(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise ConnectionError("server went away")

    with pytest.raises(ConnectionError):
        storage.fill_once(target, dies_halfway)
    assert not target.exists() and not list(tmp_path.rglob(".download-*"))

    fills = []
    def fill(folder):
        fills.append(folder)
        (folder / "model.safetensors").write_bytes(b"whole")

    assert storage.fill_once(target, fill, note="models:/kosmos-g/1") == target
    assert storage.fill_once(target, fill) == target and len(fills) == 1
    assert (target / "model.safetensors").read_bytes() == b"whole"
    assert (target / ".complete").read_text() == "models:/kosmos-g/1"

    unmarked = tmp_path / "registry" / "kosmos-g" / "2-run"
    unmarked.mkdir()
    (unmarked / "model.safetensors").write_bytes(b"stale")
    storage.fill_once(unmarked, fill)
    assert (unmarked / "model.safetensors").read_bytes() == b"whole" and len(fills) == 2


def test_upload_and_download_dir(s3_prefix, tmp_path):
    source = tmp_path / "src"
    (source / "nested").mkdir(parents=True)
    (source / "x.txt").write_text("x")
    (source / "nested" / "y.txt").write_text("y")
    written = storage.upload_dir(source, f"{s3_prefix}/tree")
    assert len(written) == 2
    target = storage.download_dir(f"{s3_prefix}/tree", tmp_path / "dst")
    assert (target / "nested" / "y.txt").read_text() == "y"


def test_unsupported_scheme_is_a_clear_error():
    with pytest.raises(storage.StorageError, match="unsupported storage scheme 'gs'"):
        storage.read_bytes("gs://bucket/key")
