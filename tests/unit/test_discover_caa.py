"""CAA from prompt sets: the vector set, its metadata, and the same vectors as from token ids.

The vector arithmetic itself is checked by hand in ``test_vectors.py``.
"""

import numpy as np

from cna_vllm.discover.caa import caa_vectors, discover_caa
from cna_vllm.discover.record import encode
from cna_vllm.vectors import VectorSet

from .planted import planted_model, planted_tokenizer, prompt_sets, token_sets


def test_discover_caa_wraps_caa_vectors_of_the_encoded_prompts():
    model, tok = planted_model(), planted_tokenizer()
    pos, neg, _ = prompt_sets(n=4)
    vs = discover_caa(model, tok, pos, neg, name="refusal-caa", site="residual", layers=[1, 3],
                      chat_template=False, batch_size=3, progress=False)
    assert isinstance(vs, VectorSet) and vs.name == "refusal-caa" and vs.site == "residual"
    ids_pos, ids_neg, _ = token_sets(n=4)
    layers, vectors = caa_vectors(model, ids_pos, ids_neg, site="residual", layers=[1, 3], progress=False)
    assert vs.layers.tolist() == layers.tolist() == [1, 3]
    np.testing.assert_allclose(vs.vectors, vectors, rtol=1e-6)
    np.testing.assert_allclose(vs.vectors[:, 0], 8.0, rtol=1e-5)  # the trigger dimension
    assert vs.discovery == {"method": "caa", "site": "residual", "positive": pos.describe(),
                            "negative": neg.describe(), "token_position": "last", "chat_template": False}


def test_with_the_chat_template_the_last_token_is_the_generation_prompt():
    model, tok = planted_model(), planted_tokenizer()
    pos, neg, _ = prompt_sets(n=4)
    vs = discover_caa(model, tok, pos, neg, name="v", site="residual", progress=False)
    assert vs.layers.tolist() == [0, 1, 2, 3] and vs.discovery["chat_template"] is True
    chat_pos = encode(tok, list(pos), chat_template=True)
    assert all(ids[-1] == chat_pos[0][-1] for ids in chat_pos)  # every prompt ends on "<a>" ...
    np.testing.assert_allclose(vs.vectors[:, 0], 0.0, atol=1e-5)  # ... so the trigger dimension is not seen there
