"""The embedded tokenizer: a byte-level BPE trained on the embedded corpus in seconds, with a small chat template.

Byte-level, so every string round-trips exactly (``decode(encode(x)) == x``) and no text is ever unknown. The chat
template is TRL-compatible: it renders ``messages`` lists, honours ``add_generation_prompt``, starts with the BOS
token (TRL tokenizes chat templates without adding special tokens), and wraps each assistant reply *and its closing
EOS* in ``{% generation %}`` markers, so ``assistant_only_loss`` trains the model to stop. A prompt rendered with
``add_generation_prompt=True`` is a token-level prefix of the prompt followed by its completion (every turn starts
with a special token, so no BPE merge crosses the boundary).
"""

from __future__ import annotations

import hashlib
import os

import datasets
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .corpus import atomic_build, build_corpus, cache_key, default_cache_dir

PAD, BOS, EOS, USER, ASSISTANT = "<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, USER, ASSISTANT)

# Bump when the tokenizer recipe or template changes, so stale caches are not reused.
TOKENIZER_FORMAT_VERSION = 1
MODEL_MAX_LENGTH = 1024
# BPE is trained on the first rows of the (domain-shuffled) train split up to this many characters: about half of
# the default corpus, which keeps training to a couple of seconds on 2 CPU cores with no visible loss in compression.
TRAIN_CHAR_BUDGET = 3_000_000

# <|bos|><|user|>question\n<|assistant|>answer<|eos|><|user|>...  (system turns render like user turns, tagged).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% elif message['role'] == 'user' %}"
    "<|user|>{{ message['content'] }}\n"
    "{% else %}"
    "<|user|>[{{ message['role'] }}] {{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def texts_of(corpus: datasets.DatasetDict | datasets.Dataset, column: str = "text") -> datasets.Dataset:
    """The split a tokenizer is trained on: ``corpus["train"]`` for a ``DatasetDict``, else ``corpus`` itself."""
    if isinstance(corpus, datasets.DatasetDict):
        return corpus["train"]
    if column not in corpus.column_names:
        raise ValueError(f"the corpus has no {column!r} column (columns: {corpus.column_names})")
    return corpus


def iter_text_batches(dataset: datasets.Dataset, column: str = "text", batch_size: int = 1000):
    """Yield the ``column`` of ``dataset`` as lists of ``batch_size`` strings (what BPE training consumes)."""
    for start in range(0, len(dataset), batch_size):
        yield dataset[start : start + batch_size][column]


def training_rows(
    dataset: datasets.Dataset, budget: int = TRAIN_CHAR_BUDGET, column: str = "text"
) -> datasets.Dataset:
    """The first rows of ``dataset`` whose texts total at most ``budget`` characters (at least one row)."""
    total = 0
    for i, text in enumerate(dataset[column]):
        total += len(text)
        if total > budget:
            return dataset.select(range(max(i, 1)))
    return dataset


def content_hash(dataset: datasets.Dataset, column: str = "text") -> str:
    """A SHA-256 of the texts (order-sensitive): the tokenizer cache key, so another corpus gets another tokenizer."""
    digest = hashlib.sha256()
    for batch in iter_text_batches(dataset, column):
        for text in batch:
            digest.update(text.encode("utf-8", "surrogatepass"))
            digest.update(b"\x00")
    return digest.hexdigest()


def train_bpe(dataset: datasets.Dataset, vocab_size: int) -> Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` entries (special tokens and the 256 byte symbols
    included) trained on the ``text`` column. No normalizer and no prefix space, so decoding is exact."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (special tokens + 256 bytes)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_text_batches(dataset), trainer=trainer, length=len(dataset))
    return tokenizer


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The ``transformers`` tokenizer around a trained BPE: pad/bos/eos, the role tokens and the chat template set."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens=[USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


def tokenizer_cache_path(text_hash: str, vocab_size: int, cache_dir: str | None = None) -> str:
    """Where :func:`build_tokenizer` stores the tokenizer trained on a corpus (by content hash) at a vocabulary size."""
    params = {
        "format": TOKENIZER_FORMAT_VERSION,
        "corpus": text_hash,
        "vocab_size": vocab_size,
        "char_budget": TRAIN_CHAR_BUDGET,
    }
    return os.path.join(default_cache_dir(cache_dir), "tokenizer", f"bpe{vocab_size}-{cache_key(params)}")


def build_tokenizer(
    corpus: datasets.DatasetDict | datasets.Dataset | None = None,
    vocab_size: int = 2048,
    seed: int = 0,
    cache_dir: str | None = None,
) -> PreTrainedTokenizerFast:
    """The embedded tokenizer: a byte-level BPE with ``vocab_size`` entries trained on the corpus's train split (its
    first ``TRAIN_CHAR_BUDGET`` characters; ``corpus`` defaults to ``build_corpus(seed, cache_dir)``, and a bare
    ``Dataset`` with a ``text`` column also works).

    Special tokens ``<|pad|>``, ``<|bos|>``, ``<|eos|>`` (pad/bos/eos) and ``<|user|>``, ``<|assistant|>`` (chat
    roles). Plain ``tokenizer(text)`` adds no special tokens; the chat template adds BOS itself. Trained in a few
    seconds at 2048 (large vocabularies such as 32000 work, more slowly) and cached under ``cache_dir``, keyed by
    the corpus content and ``vocab_size``. It exists so the default runs need no hub download.
    """
    if corpus is None:
        corpus = build_corpus(seed=seed, cache_dir=cache_dir)
    dataset = training_rows(texts_of(corpus))
    path = tokenizer_cache_path(content_hash(dataset), vocab_size, cache_dir)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        trained = wrap_tokenizer(train_bpe(dataset, vocab_size))
        atomic_build(path, trained.save_pretrained)
    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
