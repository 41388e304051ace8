"""Regenerate the TensorFlow-written checkpoint fixtures under tests/fixtures/.

Only for regenerating the fixtures: it needs TensorFlow (`pip install tensorflow-cpu numpy`),
which is never a dependency of gpt2load or its tests. Run it from the repository root:

    python3 -m venv /work/tfvenv && /work/tfvenv/bin/pip install tensorflow-cpu numpy
    /work/tfvenv/bin/python scripts/make_tf_fixture.py

It writes:
  tests/fixtures/openai-tiny/     a tiny GPT-2 in OpenAI's checkpoint layout, hparams.json,
                                  and expected.npz (every tensor as TensorFlow's reader returns it)
  tests/fixtures/tf-partitioned/  a partitioned (sliced) variable plus an ordinary one
  tests/fixtures/tf-int/          int32, float16 and bfloat16 variables
"""

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

v1 = tf.compat.v1
ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
SEED = 1234
HPARAMS = {"n_vocab": 96, "n_ctx": 32, "n_embd": 24, "n_head": 3, "n_layer": 2}


def gpt2_tensors(hp: dict, seed: int = SEED) -> dict[str, np.ndarray]:
    """Random float32 tensors with OpenAI's GPT-2 variable names and shapes, in creation order."""
    rng = np.random.default_rng(seed)
    d, f = hp["n_embd"], 4 * hp["n_embd"]

    def weight(*shape):
        return rng.normal(0.0, 0.02, size=shape).astype(np.float32)

    def gain(n):
        return (1.0 + rng.normal(0.0, 0.1, size=n)).astype(np.float32)

    def bias(n):
        return rng.normal(0.0, 0.01, size=n).astype(np.float32)

    out = {"model/wte": weight(hp["n_vocab"], d), "model/wpe": weight(hp["n_ctx"], d)}
    for i in range(hp["n_layer"]):
        p = f"model/h{i}/"
        out[p + "ln_1/g"] = gain(d)
        out[p + "ln_1/b"] = bias(d)
        out[p + "attn/c_attn/w"] = weight(1, d, 3 * d)
        out[p + "attn/c_attn/b"] = bias(3 * d)
        out[p + "attn/c_proj/w"] = weight(1, d, d)
        out[p + "attn/c_proj/b"] = bias(d)
        out[p + "ln_2/g"] = gain(d)
        out[p + "ln_2/b"] = bias(d)
        out[p + "mlp/c_fc/w"] = weight(1, d, f)
        out[p + "mlp/c_fc/b"] = bias(f)
        out[p + "mlp/c_proj/w"] = weight(1, f, d)
        out[p + "mlp/c_proj/b"] = bias(d)
    out["model/ln_f/g"] = gain(d)
    out["model/ln_f/b"] = bias(d)
    return out


def _fresh_dir(name: str) -> Path:
    path = ROOT / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _fill(sess, var, value: np.ndarray) -> None:
    """Rerun the variable's initializer with its initial value fed (adds no ops to the graph)."""
    sess.run(var.initializer, {var.initial_value: value})


def _save(outdir: Path, specs: list[tuple[str, np.ndarray, object]]) -> str:
    """Create TF1 graph variables (name, value, partitioner), fill them, save a V2 checkpoint.

    Values are fed at run time, not baked into the graph, so model.ckpt.meta stays small.
    """
    prefix = str(outdir / "model.ckpt")
    with tf.Graph().as_default():
        variables = []
        for name, value, partitioner in specs:
            var = v1.get_variable(
                name,
                shape=value.shape,
                dtype=tf.as_dtype(value.dtype),
                initializer=v1.zeros_initializer(),
                partitioner=partitioner,
            )
            variables.append((var, value))
        saver = v1.train.Saver(write_version=v1.train.SaverDef.V2, save_relative_paths=True)
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            for var, value in variables:
                if isinstance(var, tf.Variable):
                    _fill(sess, var, value)
                    continue
                # PartitionedVariable: each part gets its slice of the full value.
                for part in var:
                    offset = part._save_slice_info.var_offset
                    index = tuple(slice(o, o + n) for o, n in zip(offset, part.shape.as_list(), strict=True))
                    _fill(sess, part, value[index])
            saver.save(sess, prefix, write_meta_graph=True)
    return prefix


def _read_back(prefix: str) -> dict[str, np.ndarray]:
    """Every tensor as TensorFlow's own checkpoint reader returns it."""
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in sorted(reader.get_variable_to_shape_map())}


def make_openai_tiny() -> None:
    outdir = _fresh_dir("openai-tiny")
    tensors = gpt2_tensors(HPARAMS)
    prefix = _save(outdir, [(name, value, None) for name, value in tensors.items()])
    (outdir / "hparams.json").write_text(json.dumps(HPARAMS, indent=2) + "\n")
    expected = _read_back(prefix)
    assert set(expected) == set(tensors), sorted(set(expected) ^ set(tensors))
    for name, value in tensors.items():
        assert expected[name].dtype == np.float32 and np.array_equal(expected[name], value), name
    np.savez(outdir / "expected.npz", **expected)


def make_partitioned() -> None:
    outdir = _fresh_dir("tf-partitioned")
    rng = np.random.default_rng(SEED + 1)
    wte = rng.normal(0.0, 0.02, size=(8, 4)).astype(np.float32)
    bias = rng.normal(0.0, 0.01, size=(4,)).astype(np.float32)
    prefix = _save(
        outdir,
        [("model/wte", wte, v1.fixed_size_partitioner(2)), ("model/ln_f/b", bias, None)],
    )
    expected = _read_back(prefix)
    assert np.array_equal(expected["model/wte"], wte) and np.array_equal(expected["model/ln_f/b"], bias)
    np.savez(outdir / "expected.npz", **expected)


def make_int() -> None:
    outdir = _fresh_dir("tf-int")
    rng = np.random.default_rng(SEED + 2)
    specs = [
        ("model/ids", np.arange(-6, 6, dtype=np.int32).reshape(3, 4), None),
        ("model/half", rng.normal(0.0, 1.0, size=(2, 3)).astype(np.float16), None),
        ("model/bf16", rng.normal(0.0, 1.0, size=(5,)).astype(tf.bfloat16.as_numpy_dtype), None),
    ]
    prefix = _save(outdir, specs)
    # bfloat16 has no plain numpy dtype: stored in expected.npz upcast to float32 (exact).
    expected = {
        name: value.astype(np.float32) if value.dtype == tf.bfloat16.as_numpy_dtype else value
        for name, value in _read_back(prefix).items()
    }
    np.savez(outdir / "expected.npz", **expected)


def main() -> None:
    make_openai_tiny()
    make_partitioned()
    make_int()
    for path in sorted(ROOT.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:8d}  {path.relative_to(ROOT.parent.parent)}")


if __name__ == "__main__":
    main()
