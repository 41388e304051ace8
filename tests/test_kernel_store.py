"""The store of measured kernel choices: a fresh process on a warm store measures nothing and picks the same
kernels; a damaged, foreign or unknown entry is measured again, never an error; a folder that is a symlink or
another user's is not used; other settings or thread counts get their own entries; a stored kernel that
disagrees with the reference on this machine's input is not used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2load import Gpt2LoadError
from gpt2load.fast import kernels as k
from gpt2load.fast.kernelstore import MAX_ENTRIES, KernelStore, entry_key, machine_store
from gpt2load.fast.registry import Kernels
from gpt2load.settings import KernelSettings, Settings

# A fresh process: a small model decodes in float32, bfloat16 and int8 through a Kernels on the store named by
# argv[1]; prints what it measured and every choice it made, by name.
CHILD = """
import json, sys, torch
from pathlib import Path
from gpt2load import generate
from gpt2load.fast.backend import accelerate
from gpt2load.fast.kernelstore import KernelStore, entry_key, _NAME_OF
from gpt2load.fast.registry import Kernels
from gpt2load.model.config import GPTConfig
from gpt2load.model.gpt import GPTModel
from gpt2load.model.quant import quantize_model

torch.manual_seed(0)
cfg = GPTConfig(vocab_size=97, context_length=32, emb_dim=64, n_heads=4, n_layers=1)
kernels = Kernels(store=KernelStore(Path(sys.argv[1])))
prompt = torch.tensor([[5, 17, 33]])
for model in (GPTModel(cfg), GPTModel(cfg).to(torch.bfloat16), quantize_model(GPTModel(cfg))):
    generate(accelerate(model.eval(), kernels), prompt, 3)
chosen = {entry_key(key): _NAME_OF[fn] for key, fn in [*kernels.measured.items(), *kernels.attention_choices.items()]}
print(json.dumps({"measurements": kernels.measurements, "seconds": kernels.calibration_seconds, "chosen": chosen}))
"""


def child(store: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(store)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_measures_nothing_and_picks_the_same_kernels(tmp_path):
    first = child(tmp_path / "store")
    assert first["measurements"] > 0 and first["seconds"] > 0
    assert len(first["chosen"]) >= first["measurements"]
    (file,) = (tmp_path / "store").glob("*.json")  # written at exit
    assert all(
        v in ("plain", "onednn", "split", "native", "int8pack", "int8native", "sdpa", "attend", "attend_one")
        for v in json.loads(file.read_text())["entries"].values()
    )
    second = child(tmp_path / "store")
    assert second["measurements"] == 0 and second["seconds"] == 0
    assert second["chosen"] == first["chosen"]


# -- in this process: one matmul shape, so each test measures at most a few --------------------------------------

X, W, B = torch.randn(1, 48), torch.randn(80, 48), torch.randn(80)


def use(kernels: Kernels, x: torch.Tensor = X) -> Kernels:
    with torch.inference_mode():
        torch.testing.assert_close(kernels.linear(x, W, B), F.linear(x, W, B), atol=1e-4, rtol=1e-4)
    return kernels


def the_file(store: KernelStore, settings: KernelSettings | None = None) -> Path:
    return store.folder / f"{store.machine_key(settings or KernelSettings())[:32]}.json"


@pytest.fixture
def store(tmp_path) -> KernelStore:
    """A store holding the one shape's measured choice."""
    store = KernelStore(tmp_path / "kernels")
    kernels = use(Kernels(store=store))
    assert kernels.measurements == 1
    kernels.save()
    assert use(Kernels(store=store)).measurements == 0
    return store


def entries(store: KernelStore, settings: KernelSettings | None = None) -> dict:
    return json.loads(the_file(store, settings).read_text())["entries"]


@pytest.mark.parametrize(
    "damage",
    ["not json", "truncated", "foreign key", "other format", "entries a list", "unknown kernel", "too large", "empty"],
)
def test_a_damaged_or_foreign_file_is_measured_again_not_an_error(store, damage):
    file = the_file(store)
    text = file.read_text()
    data = json.loads(text)
    if damage == "not json":
        file.write_bytes(b"\x00\xff{{{")
    elif damage == "truncated":
        file.write_text(text[: len(text) // 2])
    elif damage == "foreign key":
        file.write_text(json.dumps({**data, "key": "0" * 64}))
    elif damage == "other format":
        file.write_text(json.dumps({**data, "format": 99}))
    elif damage == "entries a list":
        file.write_text(json.dumps({**data, "entries": list(data["entries"])}))
    elif damage == "unknown kernel":
        file.write_text(json.dumps({**data, "entries": {key: "warp-drive" for key in data["entries"]}}))
    elif damage == "too large":
        file.write_text(text + " " * (2 << 20))
    else:
        file.write_text("")
    kernels = use(Kernels(store=store))
    assert kernels.measurements == 1
    kernels.save()  # and the file is whole again
    assert len(entries(store)) == len(data["entries"])
    assert use(Kernels(store=store)).measurements == 0


def test_an_entry_naming_an_unknown_kernel_is_ignored_and_the_others_kept(store):
    file = the_file(store)
    data = json.loads(file.read_text())
    data["entries"]['["a kernel of a later version"]'] = "fused-block"
    file.write_text(json.dumps(data))
    assert use(Kernels(store=store)).measurements == 0


def test_a_symlinked_folder_is_not_used_nor_what_it_points_at(store, tmp_path):
    link = KernelStore(tmp_path / "link")
    link.folder.symlink_to(store.folder)  # a warm store behind a symlink
    before = {p.name: p.read_bytes() for p in store.folder.iterdir()}
    kernels = use(Kernels(store=link))
    assert kernels.measurements == 1
    kernels.save()
    assert {p.name: p.read_bytes() for p in store.folder.iterdir()} == before


def test_a_symlinked_file_is_not_read(store, tmp_path):
    file = the_file(store)
    moved = tmp_path / "elsewhere.json"
    file.rename(moved)
    file.symlink_to(moved)
    assert use(Kernels(store=store)).measurements == 1


@pytest.mark.skipif(os.getuid() != 0, reason="making a folder another user's needs root")
def test_a_folder_of_another_user_is_not_used(store):
    os.chown(store.folder, 65534, 65534)
    file = the_file(store)
    before = file.read_bytes()
    kernels = use(Kernels(store=store))
    assert kernels.measurements == 1
    kernels.save()
    assert file.read_bytes() == before


def test_other_settings_and_thread_counts_get_their_own_entries(store):
    other = KernelSettings(int8pack=False)  # (the same float candidates: measured again all the same)
    assert the_file(store, other) != the_file(store)
    kernels = use(Kernels(other, store=store))
    assert kernels.measurements == 1
    kernels.save()
    assert the_file(store, other).exists()

    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        kernels = use(Kernels(store=store))
        assert kernels.measurements == 1
        kernels.save()
    finally:
        torch.set_num_threads(threads)
    assert len(entries(store)) == 2
    assert use(Kernels(store=store)).measurements == 0


def test_a_stored_kernel_is_used_only_if_it_agrees_with_the_reference_here(tmp_path):
    store = KernelStore(tmp_path / "kernels")
    w, b = torch.randn(1024, 48), torch.randn(1024)  # (split cuts it at up to 8 threads)
    kernels = Kernels(store=store)
    candidates = (k._plain, k._split)
    with torch.inference_mode():
        kernels.calibrated(X, w, b, False, candidates)
    kernels.save()
    file = the_file(store)
    data = json.loads(file.read_text())
    (key,) = data["entries"]
    file.write_text(json.dumps({**data, "entries": {key: "split"}}))  # as if split had won here

    agreeing = Kernels(store=store)
    with torch.inference_mode():
        assert agreeing.calibrated(X, w, b, False, candidates) is k._split
    assert agreeing.measurements == 0

    def wrong(x, w, b, gelu):  # a reference split disagrees with
        return F.linear(x, w, b) + 1

    disagreeing = Kernels(store=store)
    with torch.inference_mode():
        assert disagreeing.calibrated(X, w, b, False, candidates, ref=wrong) is k._plain
    assert disagreeing.measurements == 0
    disagreeing.save()
    assert key not in entries(store)  # dropped: the next process measures it again


def test_the_file_is_capped_and_written_whole(tmp_path):
    store = KernelStore(tmp_path / "kernels")
    key = store.machine_key(KernelSettings())
    many = {json.dumps([i]): "plain" for i in range(MAX_ENTRIES + 100)}
    assert store.write(key, many)
    kept = store.read(key)
    assert len(kept) == MAX_ENTRIES and json.dumps([MAX_ENTRIES + 99]) in kept  # the newest
    assert [p.name for p in store.folder.iterdir()] == [f"{key[:32]}.json"]  # no temporary file left


def test_concurrent_writers_leave_a_whole_file(tmp_path):
    script = (
        "import sys\nfrom pathlib import Path\nfrom gpt2load.fast.kernelstore import KernelStore\n"
        "store = KernelStore(Path(sys.argv[1]))\n"
        "for i in range(40):\n"
        "    assert store.write(sys.argv[2], {f'[{sys.argv[3]}, {j}]': 'plain' for j in range(i + 1)})\n"
    )
    key = "f" * 64
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "kernels"), key, str(n)]) for n in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    assert len(KernelStore(tmp_path / "kernels").read(key)) == 40
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [f"{key[:32]}.json"]


def test_entry_keys_name_their_kernels_or_are_not_stored():
    assert entry_key(((k._plain, k._split), torch.float32, 1, torch.Size([3, 4]), True, False, 2)) == (
        '[["@plain","@split"],"torch.float32",1,[3,4],true,false,2]'
    )
    assert entry_key(((k._plain, lambda *a: None), torch.float32)) is None


def test_the_setting_turns_the_store_off_and_it_lives_in_the_cache_folder(tmp_path):
    assert machine_store(Settings.from_env({"GPT2LOAD_KERNEL_CACHE": "0"})) is None
    on = machine_store(Settings.from_env({"XDG_CACHE_HOME": str(tmp_path)}))
    assert on is not None and on.folder == tmp_path / "gpt2load" / "kernels"
    with pytest.raises(Gpt2LoadError, match="GPT2LOAD_KERNEL_CACHE='maybe'"):
        Settings.from_env({"GPT2LOAD_KERNEL_CACHE": "maybe"})
