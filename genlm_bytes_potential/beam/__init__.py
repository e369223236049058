"""The byte beam: a normalized autoregressive byte distribution from a token LM.

A *candidate* is a partial tokenization of the bytes read so far: the tokens it has
committed (an :class:`~genlm_bytes_potential.lm_state.LMState`), a trie node (the bytes of
the token it is in the middle of) and a log weight ``w`` = log of the LM probability of the
committed tokens times the mass of the node under the LM's next-token distribution. With
``M_c`` the trie masses of candidate ``c``'s state:

* reading byte ``b`` moves ``c`` to its child ``n·b`` with ``w += log M_c(n·b) - log M_c(n)``;
* extending (end of token, EOT) at a node with tokens ``t`` ending there gives a new
  candidate at the root with state ``c + t`` and ``w += log M_c(leaf t) - log M_c(n)``.

A :class:`Beam` for bytes ``x`` holds the candidates that read ``x`` (after pruning) and
their extensions. Its next-byte distribution over the 256 bytes and EOS is

    q(a | x) = W(x·a) / sum_a' W(x·a'),   W(x·a) = sum of the weights after reading a,

so it sums to 1 at every context where the beam is not empty, and the log-probability of
a byte string is the sum of its conditionals (``Beam.logp``). Without pruning (``K=None``,
``prune_threshold=0``) ``W(x)`` is the exact probability under the token LM that its byte
output starts with ``x`` (every tokenization counted), ``sum_a W(x·a) = W(x)`` when every
token has bytes, and ``q`` is the exact byte-level conditional.

Candidates hold no masses: a candidate's masses are a row of the model's
:class:`~genlm_bytes_potential.lm_state.MassStore` (one per context and EOS mode, kept
where the trie batch ran), and each step gathers the few masses it reads (on the host,
summing them from the row's token weights; from a GPU's rows, reading bytes known in
advance finds them already copied to the host with the row).

How the approximations enter:

* **Pruning** happens after each byte: candidates below ``prune_threshold`` times the
  beam's total weight are dropped, then all but the ``K`` heaviest; extensions below the
  threshold share of that total are not made. ``q`` is then the conditional under the
  surviving candidates only, still normalized.
* **Full support (the rule).** Pruning also keeps the heaviest candidate at which a token
  can end (a finite extension weight), when none of the kept ones can; and the heaviest
  finite extension is always made, whatever the threshold. So a beam holds up to ``K + 1``
  candidates before extension, and whenever any candidate that read ``x`` could end a
  token, the beam has a candidate at the root. A root candidate gives every byte that
  begins a token of positive LM probability (and EOS, when the LM gives an EOS token
  positive probability) ``q > 0``. Hence:

  - *byte-complete vocabularies* (every single byte is a token: GPT-2, Llama-3, Qwen):
    the root candidate reads any byte ``b`` into the node of the token ``b``, where a token
    ends; so by induction every beam has a root candidate, ``q(a | x) > 0`` for every byte
    ``a`` (given the LM's softmax gives every token positive probability) and ``prefix(x)``
    is finite for every byte string;
  - *other vocabularies*: ``q(a | x) > 0`` for every byte that begins a token, at every
    ``x`` after which some candidate that read ``x`` can end a token. A byte that no token
    begins with (e.g. 21 byte values in SmolLM2's vocabulary, among them 0x04, 0xfe, 0xff)
    can only be read inside a token, and has ``q = 0`` wherever no candidate is inside
    such a token: that is the model's support, not the pruning's.
  - canonical mode commits only canonical tokens: when every extension of a step is
    non-canonical, no root candidate exists after it.
* **What holds after pruning.** Write ``W(x) = exp(Beam.log_total)`` for the surviving
  weight and ``P(x)`` for the exact marginal (the token LM's probability that its byte
  output starts with ``x``, every tokenization counted). Then, for a beam read from
  :func:`initial_beam` without healing:

  1. ``W(x) <= P(x)``: the candidates are disjoint sets of token sequences, and pruning
     and skipped extensions only drop non-negative terms.
  2. ``logp(x) = log W(x) + sum_t [-log(1 - rho_t) - log(1 - delta_t)]``, where ``rho_t``
     is the share of weight pruned after byte ``t`` (``BeamStats.pruned_mass`` adds them
     up) and ``delta_t`` the share of the beam's weight in extensions the threshold did
     not make (0 when ``prune_threshold=0``). Each step's normalizer is the previous
     surviving weight minus the skipped extensions, so the conditionals telescope.
  3. Hence ``logp(x) >= log W(x)``, and ``logp(x) <= log P(x) + sum_t [...]``; but the
     normalized ``logp(x)`` can *exceed* ``log P(x)``: pruning removes weight from the
     denominators as well as from the numerators, so a pruned beam may give a byte
     string more probability than the exact distribution does (and, per string, less).
     Neither ``q(a | x) <= p(a | x)`` nor the reverse holds in general.
  4. Without pruning all the ``rho_t``, ``delta_t`` are 0 and ``logp(x) = log W(x) =
     log P(x)``.

* **EOS modes.** A prompt is read with EOS tokens as text (``with_eos=False``); the step
  that reads its last byte switches every candidate to the with-EOS masses of its own
  context (``w += log M^eos_c(n·b) - log M^text_c(n)``), so after a prompt no candidate can
  finish an EOS token as text.
* **Healing** is not part of ``q``. A byte that no candidate can read has ``q = 0`` and
  leaves an empty beam. With ``heal=True``, advancing by such a byte instead tries to
  re-tokenize the end of one candidate (back off at most ``heal_max_backoff`` bytes into
  its current token, commit the shorter token, replay the rest with at most
  ``heal_max_splits`` further commits); the healed beam carries on, the step is counted in
  ``stats.heals`` and its log-probability is the healed weight over the beam's total
  weight, an estimate outside the normalized distribution. Prefill and scoring use it; a
  contract-exact potential does not. With full support, healing is needed only for a
  byte that begins no token (non-byte-complete vocabularies) or after canonical filtering
  removed every extension: on byte-complete vocabularies ``stats.heals`` stays 0.

All candidates of all beams advanced together are read, pruned and extended as flat
arrays (one gather of masses per step), and all extensions that need masses share one
``batch_next_token_logprobs`` call and one trie batch.

Modules, by phase: :mod:`.core` (the types, the first beam, the next-byte distribution),
:mod:`.read` (read and prune), :mod:`.extend` (extend and assemble: :func:`advance`,
:func:`prefill`), :mod:`.heal` (token healing), :mod:`.prefetch` (contexts for the bytes
ahead), :mod:`.draft` (those a draft of the beam makes, for up to four beams reading known texts).
"""

from .core import N_OUTCOMES, Beam, BeamParams, BeamStats, initial_beam, next_byte_logprobs
from .extend import advance, prefill
from .prefetch import speculative_contexts

__all__ = [
    "N_OUTCOMES",
    "Beam",
    "BeamParams",
    "BeamStats",
    "advance",
    "initial_beam",
    "next_byte_logprobs",
    "prefill",
    "speculative_contexts",
]
