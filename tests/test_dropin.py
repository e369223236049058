"""Code written for genlm-control's ``ByteLLM`` runs on ``ByteBeamPotential`` with only the
import changed; products with genlm-control's byte grammars need no ``coerce`` and read with
``decoded_posterior``; chat prompts in every form transformers 5 returns; arguments are
checked where they are given."""

import asyncio
import importlib.metadata
import json
import re
import warnings
from pathlib import Path

import jsonschema
import lark
import numpy as np
import pytest
import torch
from genlm.bytes import BeamParams
from genlm.control import AWRS, SMC, BoolCFG, BoolFSA, JsonSchema, Potential, direct_token_sampler
from genlm.control.potential.product import Product
from tiny_models import tiny_gpt2_lm

import genlm_bytes_potential
from genlm_bytes_potential import ByteBeamPotential, TokenByteTrie, as_byte_tokens
from genlm_bytes_potential import ByteBeamPotential as ByteLLM  # the one line a ByteLLM user changes
from genlm_bytes_potential.backends import MockTokenLM
from genlm_bytes_potential.sampling import byte_posterior

EOS = b"<e>"
# every printable ASCII byte and newline, a few merges, an EOS token
ASCII_VOCAB = [bytes([b]) for b in range(32, 127)] + [b"\n", b"ab", b"12", b'{"', b'":', b"  ", EOS]


def ascii_lm(seed=0):
    return MockTokenLM(ASCII_VOCAB, seed=seed, eos_token_id=len(ASCII_VOCAB) - 1)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)
    np.random.seed(0)


# ---------------------------------------------------------------- ByteLLM usage, import changed
@pytest.fixture(scope="module")
def llm():
    return tiny_gpt2_lm()  # a genlm-backend AsyncLM over GPT-2's tokenizer, as ByteLLM gets


@pytest.fixture(scope="module")
def beam_params(llm):
    model_eos_token = llm.byte_vocab[llm.tokenizer.eos_token_id]
    return BeamParams(K=5, prune_threshold=0.0, eos_byte_strings={model_eos_token})


@pytest.fixture
def byte_llm(llm, beam_params):
    instance = ByteLLM(llm, beam_params)
    yield instance
    asyncio.run(instance.cleanup())


def test_initialization(byte_llm):
    assert isinstance(byte_llm, Potential)
    assert len(byte_llm.vocab) == 256 and byte_llm.vocab[72] == b"H"
    assert byte_llm.prompt_bytes == b""


async def test_set_prompt(byte_llm):
    byte_llm.set_prompt_from_str("Hello")
    assert byte_llm.prompt_bytes == b"Hello"
    await byte_llm.prefix([b" "])
    n = len(byte_llm.cache)
    assert n > 0
    byte_llm.set_prompt_from_str("Hello")  # the same prompt keeps the cache
    assert len(byte_llm.cache) == n
    byte_llm.set_prompt_from_str("New prompt")
    assert len(byte_llm.cache) == 0 and byte_llm.prompt_bytes == b"New prompt"


async def test_prefix_complete_and_logw_next(byte_llm):
    context = [b"H", b"e", b"l", b"l", b"o"]
    logp = await byte_llm.prefix(context)
    assert isinstance(logp, float) and logp < 0
    complete = await byte_llm.complete(context)
    assert isinstance(complete, float) and complete < logp
    assert -100 < complete - logp < 0
    weights = (await byte_llm.logw_next(context)).materialize()
    assert all(np.isfinite(weights[t]) for t in (b" ", b",", byte_llm.eos))
    assert weights[b" "] == pytest.approx(await byte_llm.prefix(context + [b" "]) - logp, abs=1e-9)


async def test_bytellm_smc_with_awrs_and_a_coerced_regex(byte_llm):
    # (AWRS counts mass below 1e-5 of a row as zero: the pattern must leave the random
    # tiny model some mass at every step)
    byte_llm.set_prompt_from_str("Here is my honest opinion:")
    pattern = r"[a-z]{3}"
    fsa = BoolFSA.from_regex(pattern)
    sampler = AWRS(byte_llm, fsa.coerce(byte_llm, f=b"".join))
    sequences = await sampler.smc(n_particles=4, max_tokens=4, ess_threshold=0.5)
    posterior = sequences.decoded_posterior
    assert len(posterior) >= 1
    assert all(re.fullmatch(pattern, text) for text in posterior)


async def test_async_with_cleans_up(llm, beam_params):
    async with ByteLLM(llm, beam_params) as byte_llm:
        await byte_llm.prefix([b"H", b"i"])
        assert len(byte_llm.cache) > 0
    assert len(byte_llm.cache) == 0
    assert await byte_llm.prefix([b"H", b"i"]) < 0  # still usable


async def test_beam_params_of_genlm_bytes_map_to_ours(llm):
    eos = llm.byte_vocab[llm.tokenizer.eos_token_id]
    theirs = ByteLLM(llm, BeamParams(K=3, prune_threshold=0.01, eos_byte_strings={eos}, heal_max_backoff=2))
    ours = ByteBeamPotential(llm, K=3, prune_threshold=0.01, eos_tokens=[eos], heal_max_backoff=2)
    also_ours = ByteBeamPotential(llm, genlm_bytes_potential.BeamParams(K=3, prune_threshold=0.01, heal_max_backoff=2))
    ctxs = [list(b" Hello"), list(b"ab")]
    want = (await ours.batch_logw_next(ctxs)).weights
    np.testing.assert_array_equal((await theirs.batch_logw_next(ctxs)).weights, want)
    np.testing.assert_array_equal((await also_ours.batch_logw_next(ctxs)).weights, want)
    assert theirs.prompt_params.heal_max_backoff == 2 and theirs.params.K == 3
    # genlm-bytes' default: no EOS strings, no EOS (as with ByteLLM)
    assert await ByteLLM(llm, BeamParams(K=2)).complete([b"a"]) == -np.inf


def test_beam_params_errors_name_the_field(llm):
    with pytest.raises(ValueError, match=r"beam_params.verbose=True is not supported"):
        ByteLLM(llm, BeamParams(K=2, verbose=True))
    with pytest.raises(TypeError, match=r"K given both"):
        ByteLLM(llm, BeamParams(K=2), K=3)
    with pytest.raises(TypeError, match=r"beam_params=5 .*expected"):
        ByteLLM(llm, 5)
    with pytest.raises(ValueError, match=r"K=0"):
        ByteLLM(llm, BeamParams(K=0))


def test_from_name_takes_bytellm_arguments(smollm2_dir):
    pot = ByteLLM.from_name(
        smollm2_dir, BeamParams(K=2, eos_byte_strings={b"<|im_end|>"}), "mock", llm_opts={"seed": 3}
    )
    assert pot.lm.seed == 3 and pot.params.K == 2 and pot.model.eos_tokens == [b"<|im_end|>"]
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ByteLLM.from_name(smollm2_dir, backend="nope")


# ---------------------------------------------------------------- products with byte grammars
@pytest.fixture(scope="module")
def pot():
    return ByteBeamPotential(ascii_lm(), K=4)


async def sample(product, max_tokens, n=4):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "common vocabulary" warning, nothing else
        sampler = direct_token_sampler(product)
        return await SMC(sampler)(n_particles=n, ess_threshold=0.5, max_tokens=max_tokens)


async def test_product_with_a_regex_samples_matching_strings(pot):
    seqs = await sample(pot * BoolFSA.from_regex(r"19[0-9]{2}"), 5)
    posterior = seqs.decoded_posterior
    assert posterior and all(re.fullmatch(r"19[0-9]{2}", s) for s in posterior)
    assert sum(posterior.values()) == pytest.approx(1.0)
    assert {k.decode(): v for k, v in byte_posterior(seqs)} == pytest.approx(dict(posterior))


async def test_product_with_a_lark_grammar_samples_parsing_strings(pot):
    grammar = 'start: "a" start "b" | "ab"'
    seqs = await sample(pot * BoolCFG.from_lark(grammar), 7)
    parser = lark.Lark(grammar)
    assert seqs.decoded_posterior
    for text in seqs.decoded_posterior:
        parser.parse(text)


async def test_chained_product_with_a_json_schema_samples_valid_json(pot):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    short = BoolFSA.from_regex(r'\{"n":[0-9]\}')
    seqs = await sample(pot * JsonSchema(schema) * short, 8, n=3)
    assert seqs.decoded_posterior
    for text in seqs.decoded_posterior:
        jsonschema.validate(json.loads(text), schema)


async def test_product_with_an_int_grammar_has_the_int_products_weights(pot):
    fsa = BoolFSA.from_regex(r"[ab]+c?")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        product = pot * fsa
    # genlm-control's own product over ints has the same bytes, and warns that they are
    # 3 of our 256 ("less than 10%"): an alphabet is meant to be small, ours does not warn
    with pytest.warns(RuntimeWarning, match="Common vocabulary"):
        plain = Product(pot.int_view(), fsa)
    assert product.vocab == [bytes([t]) for t in plain.vocab] == [b"a", b"b", b"c"]
    ctxs = [[], [b"a"], [b"a", b"b"], [b"a", b"c"]]
    ints = [[x[0] for x in c] for c in ctxs]
    got = (await product.batch_logw_next(ctxs)).weights
    np.testing.assert_array_equal(got, (await plain.batch_logw_next(ints)).weights)
    np.testing.assert_array_equal(await product.batch_prefix(ctxs), await plain.batch_prefix(ints))
    np.testing.assert_array_equal(await product.batch_complete(ctxs), await plain.batch_complete(ints))
    await product.assert_contract(ctxs[1:], rtol=1e-9)
    # ints stay accepted where tokens are read: contexts, and weights by int
    lw = await product.logw_next([97])
    assert lw[98] == lw[b"b"] > -np.inf and lw[99] == lw[b"c"] and len(product.lookup) == 4
    await product.assert_autoreg_fact([97, 98], rtol=1e-9)


async def test_a_grammar_computes_each_distinct_context_of_a_batch_once(pot):
    """After resampling, particles share contexts: the product's grammar view asks its
    grammar for each distinct one once and answers every row as the grammar would."""
    fsa = BoolFSA.from_regex(r"[ab]+c?")
    asked = []
    for name in ("batch_logw_next", "batch_prefix", "batch_complete"):
        method = getattr(fsa, name)

        async def recorded(contexts, method=method):
            asked.append([list(c) for c in contexts])
            return await method(contexts)

        setattr(fsa, name, recorded)
    view = (pot * fsa).p2
    ctxs = [[b"a"], [b"a", b"b"], [b"a"], [], [b"a", b"b"], [b"a"], [b"a", b"c"]]
    ints = [[x[0] for x in c] for c in ctxs]
    distinct = [[97], [97, 98], [], [97, 99]]
    got = (await view.batch_logw_next(ctxs)).weights
    np.testing.assert_array_equal(got, np.stack([(await fsa.logw_next(c)).weights for c in ints]))
    prefix, complete = await view.batch_prefix(ctxs), await view.batch_complete(ctxs)
    np.testing.assert_array_equal(prefix, [await fsa.prefix(c) for c in ints])
    np.testing.assert_array_equal(complete, [await fsa.complete(c) for c in ints])
    assert asked == [distinct] * 3
    np.testing.assert_array_equal((await view.batch_logw_next(ctxs[:2])).weights, got[:2])
    assert asked[-1] == distinct[:2]  # all distinct: passed as they are


# ---------------------------------------------------------------- chat prompts
MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def chat_lm(smollm2_tokenizer):
    """A mock LM with SmolLM2's vocabulary size and its real tokenizer (the prompt tokens
    are SmolLM2's; the mock's token bytes: the 256 single bytes, then distinct strings
    under a prefix the contexts never read)."""
    n = len(smollm2_tokenizer)
    vocab = [bytes([i]) for i in range(256)] + [b"\xff\xfe" + i.to_bytes(2, "big") for i in range(256, n)]
    lm = MockTokenLM(vocab, bos_token_id=smollm2_tokenizer.bos_token_id, eos_token_id=smollm2_tokenizer.eos_token_id)
    lm.tokenizer = smollm2_tokenizer
    return lm


async def test_chat_template_in_every_transformers_form(chat_lm, smollm2_tokenizer):
    tok = smollm2_tokenizer
    want = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    assert isinstance(want, list) and want[0] == tok.bos_token_id
    forms = {
        "BatchEncoding": tok.apply_chat_template(MESSAGES, add_generation_prompt=True),
        "list": want,
        "pt": tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt"),
        "np": tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="np"),
        "dict": {"input_ids": want},
        "tensor": torch.tensor(want),
        "str": tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
        "messages": MESSAGES,
    }
    assert type(forms["BatchEncoding"]).__name__ == "BatchEncoding"
    pot = ByteBeamPotential(chat_lm, K=2, prompt_tokens=want)
    assert pot.prompt_tokens == tuple(want)  # BOS not doubled
    w = (await pot.logw_next([b"a"])).weights
    for name, value in forms.items():
        pot.set_prompt(prompt_tokens=[])
        assert len(pot.prompt_tokens) == 1
        pot.set_prompt(prompt_tokens=value)
        assert pot.prompt_tokens == tuple(want), name
        np.testing.assert_array_equal((await pot.logw_next([b"a"])).weights, w)
    pot.set_prompt(prompt=MESSAGES)
    assert pot.prompt_tokens == tuple(want) and pot.prompt == b""
    pot.set_prompt(prompt=b"ab", prompt_tokens=forms["pt"])  # template, then bytes read after it
    assert pot.prompt_tokens == tuple(want) and pot.prompt == b"ab"
    assert pot.spawn().prompt_tokens == tuple(want)
    # the constructor takes the same forms
    assert ByteBeamPotential(chat_lm, K=2, prompt_tokens=forms["BatchEncoding"]).prompt_tokens == tuple(want)


def test_bad_chat_prompts_name_the_problem(chat_lm, smollm2_tokenizer):
    two_rows = torch.ones((2, 3), dtype=torch.long)
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        ByteBeamPotential(chat_lm, prompt_tokens=two_rows)
    with pytest.raises(ValueError, match="without 'input_ids'"):
        ByteBeamPotential(chat_lm, prompt_tokens={"ids": [1]})
    with pytest.raises(ValueError, match="give one of them"):
        ByteBeamPotential(chat_lm, prompt=MESSAGES, prompt_tokens=[1])
    with pytest.raises(ValueError, match="chat template"):
        ByteBeamPotential(ascii_lm(), prompt_tokens=MESSAGES)  # no tokenizer
    with pytest.raises(ValueError, match="has none"):
        ByteBeamPotential(ascii_lm(), prompt_tokens="<|im_start|>user")
    with pytest.raises(TypeError, match="item 1.5 at position 0"):
        ByteBeamPotential(chat_lm, prompt_tokens=[1.5])
    with pytest.raises(TypeError, match="expected token ids"):
        ByteBeamPotential(chat_lm, prompt_tokens=b"ab")


# ---------------------------------------------------------------- arguments checked where given
@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(device="invalid"), ValueError, r"device='invalid' is not a device; expected 'cpu'"),
        (dict(device="cuda:99"), ValueError, r"device='cuda:99', but this machine has \d+ CUDA"),
        (dict(device="meta"), ValueError, r"device='meta'; expected"),
        (dict(device=3), TypeError, r"device=3 has type int"),
        (dict(eos_tokens=b"<e>"), TypeError, r"eos_tokens=b'<e>'; expected a list of byte strings"),
        (dict(eos_tokens=["<e>"]), TypeError, r"eos_tokens item '<e>' has type str; expected bytes"),
        (dict(canonical="yes"), TypeError, r"canonical='yes'"),
        (dict(heal="no"), TypeError, r"heal='no'"),
        (dict(lookahead=-1), ValueError, r"lookahead=-1"),
        (dict(cache_size=0), ValueError, r"cache_size=0"),
        (dict(prompt=3), TypeError, r"prompt has type int"),
    ],
)
def test_constructor_arguments_fail_where_given(kwargs, err, match):
    with pytest.raises(err, match=match):
        ByteBeamPotential(ascii_lm(), **kwargs)


def test_lm_and_trie_arguments_fail_where_given():
    with pytest.raises(TypeError, match=r"lm='gpt2' has type str.*from_name"):
        ByteBeamPotential("gpt2")
    with pytest.raises(TypeError, match=r"byte_vocab\[0\]='a' has type str; expected bytes \(e.g. b'a'\)"):
        TokenByteTrie(["a", "b"], eos_tokens=["d"])
    with pytest.raises(TypeError, match=r"eos_tokens\[0\]='d' has type str"):
        TokenByteTrie([b"a", b"d"], eos_tokens=["d"])
    with pytest.raises(TypeError, match="expected a list of byte strings"):
        TokenByteTrie([b"a", b"d"], eos_tokens=b"d")
    with pytest.raises(TypeError, match="set_prompt"):
        ByteBeamPotential(ascii_lm()).set_prompt_from_str(b"bytes")


def test_version_and_typing_marker():
    assert genlm_bytes_potential.__version__ == importlib.metadata.version("genlm-bytes-potential")
    assert (Path(genlm_bytes_potential.__file__).parent / "py.typed").is_file()


# ---------------------------------------------------------------- the default model, end to end
async def test_default_model_chat_prompt_and_regex_end_to_end(recwarn):
    """The README's path on the default model and backend: a chat prompt, a regex
    product, ``decoded_posterior`` (a few bytes)."""
    recwarn.clear()
    pot = ByteBeamPotential.from_name(K=2, prompt_tokens=[{"role": "user", "content": "A year, please."}])
    assert pot.prompt_tokens[0] == pot.lm.tokenizer.bos_token_id
    seqs = await SMC(direct_token_sampler(pot * BoolFSA.from_regex(r"19[0-9]")))(
        n_particles=2, ess_threshold=0.5, max_tokens=4
    )
    assert seqs.decoded_posterior and all(re.fullmatch(r"19[0-9]", s) for s in seqs.decoded_posterior)
    ours = [w for w in recwarn if "genlm" in w.filename or "Common vocabulary" in str(w.message)]
    assert not ours, [str(w.message) for w in ours]
    await pot.cleanup()


async def test_awrs_takes_grammars_over_byte_tokens_without_warnings(pot):
    fsa = BoolFSA.from_regex(r"[a-c]{2}")
    with pytest.raises(TypeError, match=r"as_byte_tokens"):
        AWRS(pot, fsa)  # AWRS calls the condition itself: it must read byte tokens
    for condition in (as_byte_tokens(fsa), fsa.coerce(pot, f=b"".join)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            seqs = await SMC(AWRS(pot, condition, seed=0))(n_particles=3, ess_threshold=0.5, max_tokens=3)
        assert seqs.decoded_posterior and all(re.fullmatch(r"[a-c]{2}", s) for s in seqs.decoded_posterior)
