"""A1111 prompt syntax (ldm/prompt_syntax.py): the parser against A1111's own docstring examples,
the chunker, and encodings equal to an independent transcription of A1111's sd_hijack_clip on the
same text encoders (SD1: CLIP, EOS padding; SD2: OpenCLIP, zero padding) to 1e-5."""
import math
import re
from dataclasses import replace

import pytest
import torch

from ldm import Pipeline
from ldm.prompt_syntax import parse_prompt_attention, tokenize_line, unbalanced
from ldm.request import check_request
from ldm.text import hf_config_of, save_hf_tokenizer
from tiny_models import random_model, tiny_sd1, tiny_sd2

LONG = ", ".join(f"a {c} {s} next to a ({c}:1.3) {s}" for c in ("red", "green", "blue", "yellow", "pink")
                 for s in ("circle", "square", "star", "triangle")) + ", [[blurry]] sky BREAK (((sun)))"
PROMPTS = [LONG, "a (red:0.8) circle", "", "cat " * 200, "\\(literal\\) [faded] (bold"]


# -- the parser: A1111's docstring examples, verbatim ---------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1.0], ["b", 1.0]]),
    ("", [["", 1.0]]),
])
def test_parser_as_a1111(text, expected):
    assert parse_prompt_attention(text) == expected


def test_unbalanced_detected():
    assert unbalanced("(unbalanced") and unbalanced("a ] b") and unbalanced("[x") and unbalanced("x:1.2)")
    assert not unbalanced("a (b:1.2) [c] \\(d") and not unbalanced("a: b")


# -- the chunker ------------------------------------------------------------------------------------

def chunks_of(fragments, encode=lambda text: [int(w) for w in text.split()]):
    return tokenize_line(fragments, encode, bos=-1, eos=-2, comma=0)


def test_200_tokens_make_3_chunks():
    chunks = chunks_of([[" ".join(["7"] * 200), 1.0]])
    assert [len(t) for t, _ in chunks] == [77] * 3
    assert [t.count(7) for t, _ in chunks] == [75, 75, 50]
    assert all(t[0] == -1 and t[-1] == -2 for t, _ in chunks)


def test_chunk_boundary_backtracks_to_last_comma_within_20():
    chunks = chunks_of([[" ".join(["7"] * 70 + ["0"] + ["8"] * 10), 1.2]])
    (a, wa), (b, wb) = chunks
    assert a[1:72] == [7] * 70 + [0] and a[72:] == [-2] * 5 and wa[72:] == [1.0] * 5
    assert b[1:11] == [8] * 10 and wb[1:11] == [1.2] * 10
    far = chunks_of([[" ".join(["7"] * 30 + ["0"] + ["8"] * 50), 1.0]])       # comma 44 tokens back: no
    assert far[0][0][1:76] == [7] * 30 + [0] + [8] * 44


def test_break_starts_a_new_chunk():
    chunks = chunks_of(parse_prompt_attention("1 2 BREAK 3"), encode=lambda t: [int(w) for w in t.split()])
    assert [t[1:3] for t, _ in chunks] == [[1, 2], [3, -2]]


# -- A1111's encoder, transcribed from modules/sd_hijack_clip.py on the transformers / open_clip modules --

class A1111Reference:
    """FrozenCLIPEmbedderWithCustomWords (SD1, HF CLIPTokenizer) / FrozenOpenCLIPEmbedderWithCustomWords
    (SD2, open_clip's tokenizer): tokenize_line, process_tokens, EmphasisOriginal; one prompt per call."""

    def __init__(self, encoder, config, tmp_path):
        self.encoder, self.chunk_length, self.backtrack = encoder, 75, 20
        if hasattr(encoder, "transformer"):                     # SD1
            from transformers import CLIPTextModel, CLIPTokenizer
            self.hf_model = CLIPTextModel(hf_config_of(config)).eval()   # A1111's module
            self.hf_model.load_state_dict({k.removeprefix("transformer."): v for k, v in encoder.state_dict().items()})
            save_hf_tokenizer(tmp_path, "eos")
            hf = CLIPTokenizer.from_pretrained(str(tmp_path))
            self.tokenize = lambda texts: hf(texts, truncation=False, add_special_tokens=False)["input_ids"]
            self.comma_token, self.id_start = hf.get_vocab()[",</w>"], hf.bos_token_id
            self.id_end = self.id_pad = hf.eos_token_id
        else:                                                   # SD2
            from open_clip.tokenizer import SimpleTokenizer
            tok = SimpleTokenizer()
            self.tokenize = lambda texts: [tok.encode(t) for t in texts]
            self.comma_token = tok.encoder[",</w>"]
            self.id_start, self.id_end, self.id_pad = tok.encoder["<start_of_text>"], tok.encoder["<end_of_text>"], 0

    def tokenize_line(self, line):
        parsed = _a1111_parse(line)
        tokenized = self.tokenize([text for text, _ in parsed])
        chunks, chunk = [], {"tokens": [], "multipliers": []}
        last_comma = -1

        def next_chunk():
            nonlocal last_comma, chunk
            to_add = self.chunk_length - len(chunk["tokens"])
            if to_add > 0:
                chunk["tokens"] += [self.id_end] * to_add
                chunk["multipliers"] += [1.0] * to_add
            chunk["tokens"] = [self.id_start] + chunk["tokens"] + [self.id_end]
            chunk["multipliers"] = [1.0] + chunk["multipliers"] + [1.0]
            last_comma = -1
            chunks.append(chunk)
            chunk = {"tokens": [], "multipliers": []}

        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == "BREAK" and weight == -1:
                next_chunk()
                continue
            position = 0
            while position < len(tokens):
                token = tokens[position]
                if token == self.comma_token:
                    last_comma = len(chunk["tokens"])
                elif self.backtrack != 0 and len(chunk["tokens"]) == self.chunk_length and last_comma != -1 \
                        and len(chunk["tokens"]) - last_comma <= self.backtrack:
                    break_location = last_comma + 1
                    reloc_tokens = chunk["tokens"][break_location:]
                    reloc_mults = chunk["multipliers"][break_location:]
                    chunk["tokens"] = chunk["tokens"][:break_location]
                    chunk["multipliers"] = chunk["multipliers"][:break_location]
                    next_chunk()
                    chunk["tokens"], chunk["multipliers"] = reloc_tokens, reloc_mults
                if len(chunk["tokens"]) == self.chunk_length:
                    next_chunk()
                chunk["tokens"].append(token)
                chunk["multipliers"].append(weight)
                position += 1
        if chunk["tokens"] or not chunks:
            next_chunk()
        return chunks

    def encode_with_transformers(self, tokens):
        e = self.encoder
        if hasattr(e, "transformer"):                          # CLIP_stop_at_last_layers = 1
            return self.hf_model(input_ids=tokens).last_hidden_state
        m = e.model                                            # FrozenOpenCLIPEmbedder, layer "penultimate"
        x = m.token_embedding(tokens) + m.positional_embedding
        blocks = m.transformer.resblocks
        for i, r in enumerate(blocks):
            if i == len(blocks) - 1:                           # layer_idx = 1
                break
            x = r(x, attn_mask=m.attn_mask)
        return m.ln_final(x)

    def process_tokens(self, remade_batch_tokens, batch_multipliers):
        tokens = torch.asarray(remade_batch_tokens)
        if self.id_end != self.id_pad:
            for batch_pos in range(len(remade_batch_tokens)):
                index = remade_batch_tokens[batch_pos].index(self.id_end)
                tokens[batch_pos, index + 1:tokens.shape[1]] = self.id_pad
        z = self.encode_with_transformers(tokens)
        multipliers = torch.asarray(batch_multipliers)
        original_mean = z.mean()
        z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
        new_mean = z.mean()
        return z * (original_mean / new_mean)

    def __call__(self, text):
        chunks = self.tokenize_line(text)
        return torch.hstack([self.process_tokens([c["tokens"]], [c["multipliers"]]) for c in chunks])


def _a1111_parse(text):
    """modules/prompt_parser.py parse_prompt_attention, transcribed."""
    re_attention = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")
    re_break = re.compile(r"\s*\bBREAK\b\s*", re.S)
    res, round_brackets, square_brackets = [], [], []

    def multiply_range(start_position, multiplier):
        for p in range(start_position, len(res)):
            res[p][1] *= multiplier

    for m in re_attention.finditer(text):
        text, weight = m.group(0), m.group(1)
        if text.startswith("\\"):
            res.append([text[1:], 1.0])
        elif text == "(":
            round_brackets.append(len(res))
        elif text == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif text == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(re_break, text)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if len(res) == 0:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pipe(request):
    cfg = {"sd1": tiny_sd1, "sd2": tiny_sd2}[request.param]()
    return Pipeline(random_model(cfg))


def test_encodings_equal_a1111(pipe, tmp_path):
    ref = A1111Reference(pipe.text_encoder, pipe.config.text_encoder, tmp_path)
    with pytest.warns(UserWarning, match="unbalanced brackets"):
        ours = pipe.encode_prompt(PROMPTS, prompt_syntax="a1111")
    with torch.no_grad():
        refs = [ref(p) for p in PROMPTS]
        empty = ref("")
    chunks = [r.shape[1] // 77 for r in refs]
    assert chunks == [4, 1, 1, 3, 1] and ours.shape[1] == 77 * max(chunks)
    worst = 0.0
    for row, r, k in zip(ours, refs, chunks):
        worst = max(worst, (row[:77 * k] - r[0]).abs().max().item())
        for j in range(k, max(chunks)):               # shorter prompts: empty-prompt chunks, as pad_cond
            worst = max(worst, (row[77 * j:77 * (j + 1)] - empty[0]).abs().max().item())
    print(f"max |ours - A1111| = {worst:.2e}")
    assert worst <= 1e-5
    assert (ours[1, :77] - pipe.encode_prompt(["a red circle"], prompt_syntax="a1111")[0]).abs().max() > 1e-4


def test_plain_is_todays_encoding(pipe):
    prompts = ["a red circle", "cat " * 100]
    with torch.no_grad(), pytest.warns(UserWarning, match="truncated"):
        today = pipe.text_encoder(pipe.text_encoder.tokenize(prompts))
    with pytest.warns(UserWarning, match="truncated"):
        assert torch.equal(pipe.encode_prompt(prompts), today)
    with pytest.warns(UserWarning, match="truncated"):
        assert torch.equal(pipe.encode_prompt(prompts, prompt_syntax="plain"), today)


class Counting(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, x, t, context):
        self.calls.append((x.shape[0], context.shape[1]))
        return self.unet(x, t, context)


def test_long_negative_short_prompt_one_batched_call(pipe):
    counter = Counting(pipe.unet)
    original, pipe.model.model.diffusion_model = pipe.model.model.diffusion_model, counter
    try:
        out = pipe(["a circle", "a square"], negative_prompt="cat " * 160, steps=3, guidance_scale=5.0, seed=0,
                   sampler="ddim", output_type="pil", prompt_syntax="a1111", regions=None)
        assert counter.calls == [(4, 77 * 3)] * 3
        counter.calls.clear()
        pipe(LONG, steps=2, guidance_scale=5.0, seed=0, sampler="ddim", output_type="latent",
             prompt_syntax="a1111", regions=[("a (red:1.2) circle", (0, 0, 0.5, 1))], regions_from_t=0)
        assert counter.calls == [(3, 77 * 4)] * 2            # null + prompt + region rows, padded alike
    finally:
        pipe.model.model.diffusion_model = original
    assert out[0].info["prompt_syntax"] == "a1111" and out.request.prompt_syntax == "a1111"


def test_unbalanced_warns_and_encodes(pipe):
    with pytest.warns(UserWarning, match=r"unbalanced brackets.*'\(a red circle'"):
        z = pipe.encode_prompt(["(a red circle"], prompt_syntax="a1111")
    assert z.shape[1] == 77 and torch.isfinite(z).all()


def test_bad_syntax_and_t5_refused(pipe):
    args = (None,) * 8 + (0.0, None, 1, "pil", 0.0, None, None, ())
    with pytest.raises(ValueError, match="prompt_syntax must be one of plain, a1111"):
        check_request(pipe, "a", *args, prompt_syntax="A1111")
    with pytest.raises(ValueError, match="prompt_syntax must be one of"):
        pipe.encode_prompt(["a"], prompt_syntax="compel")
    t5 = type("P", (), {"config": replace(pipe.config, text_encoder=replace(pipe.config.text_encoder, kind="t5"))})
    with pytest.raises(ValueError, match="T5: use prompt_syntax='plain'"):
        check_request(t5, "a", *args, prompt_syntax="a1111")
    assert math.isclose(parse_prompt_attention("(a:1.5)")[0][1], 1.5)
