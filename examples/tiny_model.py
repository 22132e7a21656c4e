"""What the examples train when no ``--model`` is given: a tiny random Llama and a byte-level tokenizer, built
offline in seconds, plus a few lines of text and a few chat pairs. Only the shape is real: the point is to
run the code, not to learn anything. Pass ``--model`` a local folder or a hub name to train a real model.
"""

from __future__ import annotations

import transformers

# the byte-level BPE tokenizer sat-train trains for its tiny base
from sat_trainer.app.data.tokenizer import train_tokenizer

TEXT = [
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "And all the clouds that lowered upon our house in the deep bosom of the ocean buried.",
    "Once more unto the breach, dear friends, once more, or close the wall up with our English dead.",
    "In peace there's nothing so becomes a man as modest stillness and humility.",
    "The quality of mercy is not strained; it droppeth as the gentle rain from heaven.",
    "All the world's a stage, and all the men and women merely players.",
    "Some are born great, some achieve greatness, and some have greatness thrust upon them.",
    "We few, we happy few, we band of brothers; for he today that sheds his blood with me shall be my brother.",
]

CHATS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("What do bees make?", "Bees make honey and wax."),
    ("Which planet is closest to the sun?", "Mercury is the closest planet to the sun."),
    ("What is two plus three?", "Two plus three is five."),
    ("What language is spoken in Brazil?", "Portuguese is spoken in Brazil."),
    ("How many days are in a week?", "A week has seven days."),
]


def load(name: str = "tiny") -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """(model, tokenizer): ``"tiny"`` builds them here; anything else is read with ``from_pretrained``.

    Args:
        name: ``"tiny"``, a local model folder or a hub name.
    Returns:
        A causal LM in training precision (fp32) and its tokenizer, with a pad token.
    """
    if name != "tiny":
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        return transformers.AutoModelForCausalLM.from_pretrained(name), tokenizer
    tokenizer = train_tokenizer(TEXT + [q + " " + a for q, a in CHATS], vocab_size=320)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return transformers.LlamaForCausalLM(config), tokenizer
