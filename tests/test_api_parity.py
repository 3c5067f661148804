"""sentence-transformers parity of the inference API (mmembed.api): ``encode(truncate_dim=, normalize_embeddings=,
precision=)``, ``encode_query`` / ``encode_document``, ``similarity`` and saving / loading those settings.

Each check runs sentence-transformers' own code on the same float vectors: ``quantize_embeddings``,
``truncate_embeddings``, ``SimilarityFunction``, and ``SentenceTransformer.encode`` itself over a lookup module that
returns mmembed's float embeddings, so the order of truncation, normalization and quantization is compared too.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import mmembed
from mmembed import api
from mmembed.io import CONFIG_NAME, ModelDirError

TEXTS = ["a red circle", "two blue squares on the left", "what color is it?", "cat", "a green triangle", "x y z"]


@pytest.fixture(scope="module")
def st():
    """sentence-transformers (the ``dev`` extra); the checks against it skip without it."""
    return pytest.importorskip("sentence_transformers")


def _floats(n: int = 130, d: int = 20, seed: int = 0) -> np.ndarray:
    """(n, d) float32 unit vectors; d not a multiple of 8, so packbits pads."""
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("precision", api.PRECISIONS)
def test_quantize_equals_sentence_transformers(st, precision: str) -> None:
    quantize_embeddings = st.util.quantize_embeddings  # sentence_transformers.util.quantization (6.x)
    x = _floats()
    ours, theirs = api.quantize_embeddings(x, precision), quantize_embeddings(x, precision=precision)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and np.array_equal(ours, theirs)
    assert np.array_equal(api.quantize_embeddings(torch.from_numpy(x), precision), theirs)  # a tensor in
    calib = _floats(200, seed=1)[:, :20] * 0.5  # narrower than x: values outside the buckets are clipped
    ranges = np.vstack([calib.min(0), calib.max(0)])
    for kw in ({"calibration_embeddings": calib}, {"ranges": ranges}):
        assert np.array_equal(api.quantize_embeddings(x, precision, **kw), quantize_embeddings(x, precision, **kw))
    empty = np.zeros((0, 20), np.float32)
    a, b = api.quantize_embeddings(empty, precision), quantize_embeddings(empty, precision=precision)
    assert a.shape == b.shape and a.dtype == b.dtype


def test_quantize_refuses_what_sentence_transformers_refuses() -> None:
    with pytest.raises(ValueError, match="single embedding"):
        api.quantize_embeddings(_floats(1), "int8")
    with pytest.raises(ValueError, match="float"):
        api.quantize_embeddings(np.zeros((3, 4), np.int8), "uint8")
    with pytest.raises(ValueError, match="precision must be one of"):
        api.quantize_embeddings(_floats(3), "int4")


def _twin(st, table: np.ndarray, prompts: dict[str, str] | None = None):
    """A sentence-transformers model whose one module returns ``table[i]`` for the input ``"i"``, with exactly
    ``prompts`` (sentence-transformers 6 adds empty ``query`` / ``document`` prompts to every model, which would hide
    its ``passage`` / ``corpus`` fallback). The module records the prompt of each call in ``.prompts``."""
    from sentence_transformers.base.modules.input_module import InputModule

    class Table(InputModule):
        def __init__(self, table: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("table", table)
            self.prompts: list[str | None] = []

        def preprocess(self, inputs: list[str], prompt: str | None = None, **kw: object) -> dict[str, torch.Tensor]:
            self.prompts.append(prompt)
            return {"idx": torch.tensor([int(s) for s in inputs])}

        def forward(self, features: dict[str, torch.Tensor], **kw: object) -> dict[str, torch.Tensor]:
            features["sentence_embedding"] = self.table[features["idx"]]
            return features

        def save(self, *args: object, **kwargs: object) -> None:  # never saved
            pass

        def get_embedding_dimension(self) -> int:
            return int(self.table.shape[1])

    model = st.SentenceTransformer(modules=[Table(torch.from_numpy(table))], device="cpu")
    model.prompts = dict(prompts or {})
    return model


def test_encode_equals_sentence_transformers_encode(st, tiny_model) -> None:
    full = tiny_model.encode(texts=TEXTS, batch_size=4)  # the model's own output: (N, 64), L2-normalized
    twin = _twin(st, full)
    ids = [str(i) for i in range(len(TEXTS))]
    for truncate_dim in (None, 16, 40):
        for normalize in (False, True):
            for precision in api.PRECISIONS:
                kw = dict(truncate_dim=truncate_dim, normalize_embeddings=normalize, precision=precision)
                ours, theirs = tiny_model.encode(texts=TEXTS, batch_size=4, **kw), twin.encode(ids, **kw)
                assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), kw
    ours = tiny_model.encode(texts=TEXTS, batch_size=4, truncate_dim=16, convert_to="torch")
    assert isinstance(ours, torch.Tensor) and ours.is_contiguous()
    assert torch.equal(ours, torch.from_numpy(st.util.truncate_embeddings(full, 16)))  # no re-normalization
    assert np.linalg.norm(ours.numpy(), axis=1).max() < 1.0
    packed = tiny_model.encode(texts=TEXTS, precision="ubinary", convert_to="torch")
    assert packed.dtype == torch.uint8 and packed.shape == (len(TEXTS), 8)
    assert tiny_model.encode(texts=[], precision="binary").shape == (0, 8)


def test_truncate_dim_attribute_and_errors(tiny_model) -> None:
    full = tiny_model.encode(texts=TEXTS[:2])
    tiny_model.truncate_dim = 8
    assert tiny_model.get_embedding_dimension() == 8 and tiny_model.embed_dim == 64
    assert np.array_equal(tiny_model.encode(texts=TEXTS[:2]), full[:, :8])
    assert tiny_model.encode(texts=TEXTS[:2], truncate_dim=32).shape == (2, 32)  # the argument wins
    for bad in (0, -1, 2.5, True, 65):
        with pytest.raises(ValueError, match="truncate_dim"):
            tiny_model.encode(texts=TEXTS[:2], truncate_dim=bad)
    with pytest.raises(ValueError, match="precision"):
        tiny_model.encode(texts=TEXTS[:2], precision="float16")


@pytest.mark.parametrize("name", api.SIMILARITY_FUNCTIONS)
def test_similarity_equals_sentence_transformers(st, tiny_model, name: str) -> None:
    SimilarityFunction = st.SimilarityFunction
    a = tiny_model.encode(texts=TEXTS, truncate_dim=24)  # not unit vectors: cosine must normalize
    b = a[::-1].copy() * 1.5
    tiny_model.similarity_fn_name = SimilarityFunction(name)  # the enum works too
    assert tiny_model.similarity_fn_name == name
    theirs = SimilarityFunction.to_similarity_fn(name)(torch.from_numpy(a), torch.from_numpy(b))
    ours = tiny_model.similarity(a, b)
    assert isinstance(ours, np.ndarray) and ours.shape == (len(TEXTS), len(TEXTS))
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=1e-6)
    ours_t = tiny_model.similarity(torch.from_numpy(a), b)  # torch in, torch out; b follows a
    assert isinstance(ours_t, torch.Tensor) and torch.allclose(ours_t, theirs, atol=1e-6)
    pair = SimilarityFunction.to_similarity_pairwise_fn(name)(torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(tiny_model.similarity_pairwise(a, b), pair.numpy(), rtol=1e-5, atol=1e-5)
    twin = _twin(st, a)
    twin.similarity_fn_name = name
    np.testing.assert_allclose(ours, twin.similarity(a, b).numpy(), rtol=1e-6, atol=1e-6)


def test_similarity_default_and_backward_compatible_call(tiny_model) -> None:
    x = tiny_model.encode(texts=TEXTS[:3])
    assert tiny_model.similarity_fn_name == "cosine"  # the model normalizes
    np.testing.assert_allclose(tiny_model.similarity(x, x), x @ x.T, atol=1e-6)  # = the former dot product
    assert tiny_model.similarity(x[0], x).shape == (1, 3)  # a vector is one row, as in sentence-transformers
    tiny_model.similarity_fn_name = None
    tiny_model.cfg.normalize = False
    assert tiny_model.similarity_fn_name == "dot"
    with pytest.raises(ValueError, match="similarity_fn_name must be one of"):
        tiny_model.similarity_fn_name = "hamming"


@pytest.mark.parametrize(
    "prompts",
    [{"query": "Q: ", "document": "D: ", "passage": "P: "}, {"query": "Q: ", "passage": "P: ", "corpus": "C: "}],
)
def test_encode_query_and_document_pick_the_prompts_sentence_transformers_picks(st, tiny_model, prompts) -> None:
    tiny_model.cfg.prompts = dict(prompts)
    twin = _twin(st, np.zeros((1, 4), np.float32), prompts)
    twin.encode_query(["0"]), twin.encode_document(["0"])
    st_query, st_doc = twin[0].prompts
    for encode, chosen in ((tiny_model.encode_query, st_query), (tiny_model.encode_document, st_doc)):
        np.testing.assert_array_equal(encode(texts=TEXTS[:2]), tiny_model.encode(texts=TEXTS[:2], instruction=chosen))
    explicit = tiny_model.encode_query(texts=TEXTS[:2], instruction="Find the image.")  # an explicit one wins
    np.testing.assert_array_equal(explicit, tiny_model.encode(texts=TEXTS[:2], instruction="Find the image."))
    np.testing.assert_array_equal(
        tiny_model.encode_document(texts=TEXTS[:2], prompt_name="query", truncate_dim=8),
        tiny_model.encode(texts=TEXTS[:2], instruction="Q: ")[:, :8],
    )


def test_missing_role_prompt_falls_back_to_no_instruction_with_one_note(st, tiny_model, caplog) -> None:
    tiny_model.cfg.prompts = {"caption": "Describe: "}
    twin = _twin(st, np.zeros((1, 4), np.float32), {"caption": "Describe: "})
    twin.encode_query(["0"])
    assert twin[0].prompts == [None]  # sentence-transformers: no prompt at all
    api._NOTED.clear()
    with caplog.at_level(logging.INFO, logger="mmembed.api"):
        a = tiny_model.encode_query(texts=TEXTS[:2])
        tiny_model.encode_query(texts=TEXTS[:2])
    np.testing.assert_array_equal(a, tiny_model.encode(texts=TEXTS[:2]))
    notes = [r for r in caplog.records if "no saved" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO and "'caption'" in notes[0].getMessage()


def test_prompt_and_prompt_name_arguments(tiny_model) -> None:
    tiny_model.cfg.prompts = {"query": "Q: "}
    ref = tiny_model.encode(texts=TEXTS[:2], instruction="Q: ")
    np.testing.assert_array_equal(tiny_model.encode(texts=TEXTS[:2], prompt_name="query"), ref)
    np.testing.assert_array_equal(tiny_model.encode(texts=TEXTS[:2], instruction="query"), ref)  # as before
    literal = tiny_model.encode(texts=TEXTS[:2], prompt="query")  # a literal prompt is never looked up
    assert np.abs(literal - ref).max() > 1e-4
    with pytest.raises(ValueError, match=r"prompt_name 'doc' is not a saved prompt.*'query'"):
        tiny_model.encode(texts=TEXTS[:2], prompt_name="doc")
    with pytest.raises(ValueError, match="at most one of"):
        tiny_model.encode(texts=TEXTS[:2], instruction="x", prompt="y")


def test_saved_similarity_truncate_dim_and_matryoshka_dims_round_trip(tiny_model, tmp_path) -> None:
    tiny_model.similarity_fn_name, tiny_model.truncate_dim = "manhattan", 16
    tiny_model.matryoshka_dims = (64, 32, 16)
    out = tiny_model.save(tmp_path / "m")
    meta = json.loads((out / CONFIG_NAME).read_text())
    assert (meta["similarity"], meta["truncate_dim"], meta["matryoshka_dims"]) == ("manhattan", 16, [64, 32, 16])
    card = (out / "README.md").read_text()
    assert "Matryoshka dimensions trained (`loss.matryoshka_dims`): 64, 32, 16" in card and "truncate_dim=16" in card
    loaded = mmembed.load(out)
    assert (loaded.similarity_fn_name, loaded.truncate_dim, loaded.matryoshka_dims) == ("manhattan", 16, (64, 32, 16))
    np.testing.assert_array_equal(loaded.encode(texts=TEXTS[:2]), tiny_model.encode(texts=TEXTS[:2]))
    other = mmembed.load(out, truncate_dim=32, similarity_fn_name="dot")  # the caller's settings win
    assert (other.similarity_fn_name, other.get_embedding_dimension()) == ("dot", 32)
    with pytest.raises(ValueError, match="exceeds the model's embedding dimension 64"):
        mmembed.load(out, truncate_dim=65)
    with pytest.raises(ValueError, match="similarity_fn_name"):
        mmembed.load(out, similarity_fn_name="jaccard")
    for key, bad in (("similarity", "l2"), ("truncate_dim", 0), ("truncate_dim", 65), ("matryoshka_dims", [64, "8"])):
        (out / CONFIG_NAME).write_text(json.dumps({**meta, key: bad}))
        with pytest.raises(ModelDirError, match=key):
            mmembed.load(out)


def test_unset_settings_keep_the_saved_directory_as_before(tiny_model, tmp_path) -> None:
    meta = json.loads((tiny_model.save(tmp_path / "m") / CONFIG_NAME).read_text())
    assert meta["similarity"] == "cosine" and "truncate_dim" not in meta and "matryoshka_dims" not in meta
    loaded = mmembed.load(tmp_path / "m")
    assert loaded.truncate_dim is None and loaded.matryoshka_dims is None and loaded.similarity_fn_name == "cosine"
