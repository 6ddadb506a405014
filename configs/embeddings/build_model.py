"""Build ``text_embedder.onnx``: raw text in, one L2-normalised embedding per row out.

Tokenisation happens inside the graph, so a server can take the text column as it is:

    text [N] string
      -> StringNormalizer (lowercase, locale "C": ASCII A-Z only)
      -> StringSplit (whitespace; [N, L] tokens padded with "", plus the token count per row)
      -> ai.onnx.ml LabelEncoder (token -> vocab id; unknown -> UNK id 0)
      -> Gather on a seeded random table [V, DIM]
      -> masked mean over the real tokens (padding is excluded; an empty text gives a zero vector)
      -> L2 normalisation
    embedding [N, DIM] float32

Every op is a standard ONNX op (ai.onnx opset 20, ai.onnx.ml opset 2) run by onnxruntime's CPU
provider. Run ``python configs/embeddings/build_model.py`` to rebuild the file beside this script;
the output is deterministic (fixed seed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODEL_FILE = "text_embedder.onnx"
DIM = 32
SEED = 20240611
OPSET = 20  # StringSplit is new in opset 20
ML_OPSET = 2  # LabelEncoder with keys_strings / values_int64s / default_int64
IR_VERSION = 10  # ONNX 1.16+; onnxruntime 1.32 accepts it
UNK_ID = 0
# StringNormalizer's default locale is en_US.UTF-8, which many hosts (and containers) lack: the
# session then fails to load. "C" exists everywhere and lowercases ASCII letters only, which is
# all this ASCII vocabulary needs.
LOCALE = "C"

# About 300 common English words. Id 0 is [UNK]; word i of this list has id i + 1.
WORDS = """
the be to of and a in that have i it for not on with he as you do at this but his by from they
we say her she or an will my one all would there their what so up out if about who get which go
me when make can like time no just him know take people into year your good some could them see
other than then now look only come its over think also back after use two how our work first well
way even new want because any these give day most us is are was were been has had did said
man woman child children world life hand part place case week company system program question
government number night point home water room mother father area money story fact month lot right
study book eye job word business issue side kind head house service friend power hour game line
end member law car city community name president team minute idea kid body information school
face others level office door health person art war history party result change morning reason
research girl guy moment air teacher force education dog cat bird fish horse tree flower river
sea sun moon star sky rain snow wind fire earth stone road street town country food bread apple
milk coffee tea music song film picture color red blue green black white big small long short
high low old young great little own same few last next early late happy sad fast slow hot cold
warm open close begin start stop run walk talk read write play eat drink sleep love hate help
find tell ask feel try leave call keep let put mean seem turn show hear live believe bring happen
sit stand lose pay meet include continue set learn lead understand watch follow create speak
allow add spend grow offer remember buy wait serve die send expect build stay fall cut reach kill
remain suggest raise pass sell decide return explain hope develop carry break receive agree
support hit produce eat cover catch draw choose computer phone data model server network language
text machine learning vector search query
""".split()


def vocabulary() -> list[str]:
    """The vocabulary in id order, without duplicates (id 0, [UNK], is not in the list)."""
    seen: dict[str, None] = {}
    for w in WORDS:
        seen.setdefault(w, None)
    return list(seen)


def embedding_table(vocab_size: int, dim: int = DIM, seed: int = SEED) -> np.ndarray:
    """[vocab_size + 1, dim] float32, row 0 for [UNK]. Seeded, so rebuilding gives the same file."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((vocab_size + 1, dim)).astype(np.float32)


def make_model(dim: int = DIM, seed: int = SEED) -> onnx.ModelProto:
    vocab = vocabulary()
    table = embedding_table(len(vocab), dim, seed)
    const = numpy_helper.from_array
    initializers = [
        const(table, "embedding_table"),
        const(np.array([1], dtype=np.int64), "axes_1"),
        const(np.array([2], dtype=np.int64), "axes_2"),
        const(np.array(1, dtype=np.int64), "one_i64"),
        const(np.array(0, dtype=np.int64), "zero_i64"),
        const(np.array(1.0, dtype=np.float32), "one_f32"),
        const(np.array(1e-12, dtype=np.float32), "eps"),
    ]
    node = helper.make_node
    nodes = [
        # 1. lowercase (is_case_sensitive keeps its default; no stopwords, so the shape stays [N])
        node("StringNormalizer", ["text"], ["lowered"], case_change_action="LOWER", locale=LOCALE,
             name="lowercase"),
        # 2. split on runs of whitespace: tokens [N, L] padded with "", n_tokens [N]
        node("StringSplit", ["lowered"], ["tokens", "n_tokens"], name="split"),
        # 3. token -> id; padding "" and unknown words both get UNK_ID (padding is masked below)
        node("LabelEncoder", ["tokens"], ["token_ids"], domain="ai.onnx.ml", name="vocab",
             keys_strings=vocab, values_int64s=list(range(1, len(vocab) + 1)), default_int64=UNK_ID),
        # 4. ids -> vectors [N, L, D]
        node("Gather", ["embedding_table", "token_ids"], ["token_vectors"], axis=0, name="lookup"),
        # 5. mask [N, L]: position < n_tokens
        node("Shape", ["tokens"], ["tokens_shape"], name="tokens_shape"),
        node("Gather", ["tokens_shape", "one_i64"], ["max_len"], axis=0, name="max_len"),
        node("Range", ["zero_i64", "max_len", "one_i64"], ["positions"], name="positions"),
        node("Unsqueeze", ["n_tokens", "axes_1"], ["n_tokens_col"], name="n_tokens_col"),
        node("Less", ["positions", "n_tokens_col"], ["mask"], name="mask"),
        node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT, name="mask_f"),
        node("Unsqueeze", ["mask_f", "axes_2"], ["mask_3d"], name="mask_3d"),
        # 6. masked mean: sum of real token vectors / max(n_tokens, 1)
        node("Mul", ["token_vectors", "mask_3d"], ["masked"], name="apply_mask"),
        node("ReduceSum", ["masked", "axes_1"], ["summed"], keepdims=0, name="sum_tokens"),
        node("Cast", ["n_tokens"], ["n_tokens_f"], to=TensorProto.FLOAT, name="n_tokens_f"),
        node("Max", ["n_tokens_f", "one_f32"], ["denominator"], name="guard_empty"),
        node("Unsqueeze", ["denominator", "axes_1"], ["denominator_col"], name="denominator_col"),
        node("Div", ["summed", "denominator_col"], ["mean"], name="mean"),
        # 7. L2 normalisation; a zero vector (empty text) stays zero
        node("Mul", ["mean", "mean"], ["squared"], name="squared"),
        node("ReduceSum", ["squared", "axes_1"], ["sum_squares"], keepdims=1, name="sum_squares"),
        node("Sqrt", ["sum_squares"], ["norm"], name="norm"),
        node("Max", ["norm", "eps"], ["safe_norm"], name="guard_zero"),
        node("Div", ["mean", "safe_norm"], ["embedding"], name="normalise"),
    ]
    graph = helper.make_graph(
        nodes,
        "text_embedder",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])],
        initializer=initializers,
    )
    graph.doc_string = (
        f"Bag-of-words text embedder: lowercase, whitespace split, {len(vocab)}-word vocabulary "
        f"(+[UNK]), seeded random table (seed {seed}), masked mean, L2 norm."
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)],
        producer_name="iskander-example-embeddings",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def build(out_dir: Path | str, dim: int = DIM, seed: int = SEED) -> Path:
    """Write ``text_embedder.onnx`` into ``out_dir`` (created if needed) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / MODEL_FILE
    onnx.save(make_model(dim, seed), path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="output folder (default: this script's folder)")
    args = parser.parse_args(argv)
    path = build(args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(vocabulary())} words + [UNK], dim {DIM})")


if __name__ == "__main__":
    main()
