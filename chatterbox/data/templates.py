"""Question templates, answer heads/tails and preambles of upstream's referring data (spec §3.5).

The spec quotes one example per list and the list sizes (REFG: 20, FINAL: 30, REGION: 10); upstream's
exact wording was not copied. Each list below keeps the quoted example verbatim and fills the rest with
paraphrases of the same request in the same register, so the number of choices, the placeholder
`<spi_descript>` and how it is substituted match upstream; the other sentences are ours. Treat them as
a faithful approximation, not a copy.
"""
from __future__ import annotations

SPI = "<spi_descript>"

#: Describe one region (RefCOCOg; DR:118-139). 20 templates.
REFG_QUESTIONS = [
    "What can you tell me about the region indicated by <spi_descript> in the image?",
    "Can you describe the region marked by <spi_descript> in the picture?",
    "Please describe the object in <spi_descript>.",
    "What is shown in the area <spi_descript> of this image?",
    "Could you tell me what <spi_descript> contains?",
    "Give a short description of the region <spi_descript>.",
    "What do you see in the region <spi_descript>?",
    "Describe what appears inside <spi_descript>.",
    "Can you identify the object located at <spi_descript>?",
    "What is the thing in <spi_descript> of the picture?",
    "Please explain what the region <spi_descript> shows.",
    "How would you describe the area <spi_descript> in the image?",
    "Tell me about the object inside <spi_descript>.",
    "What does the region <spi_descript> depict?",
    "Could you provide a brief description of <spi_descript>?",
    "I am curious about the region <spi_descript>. What is it?",
    "What is located in the part of the image marked <spi_descript>?",
    "Please give me a description of what <spi_descript> highlights.",
    "Can you refer to the region <spi_descript> and describe it?",
    "What is the content of the region <spi_descript>?",
]

#: Describe several regions at once (VG, Flickr30K; DR:85-116). 30 templates.
FINAL_QUESTIONS = [
    "Could you please give me a detailed description of these areas <spi_descript>?",
    "Please describe the regions <spi_descript> in detail.",
    "Can you tell me what is in each of the areas <spi_descript>?",
    "What do the regions <spi_descript> show?",
    "Describe the contents of <spi_descript>.",
    "Give me a description of the areas <spi_descript> of the image.",
    "What can you see in the regions <spi_descript>?",
    "Please explain what each of <spi_descript> contains.",
    "Could you describe the objects in <spi_descript>?",
    "I would like a description of these regions: <spi_descript>.",
    "Tell me about the areas <spi_descript> in the picture.",
    "What is happening in the regions <spi_descript>?",
    "Can you provide details about <spi_descript>?",
    "Please give a description of every region in <spi_descript>.",
    "What are the objects located at <spi_descript>?",
    "Describe what you observe in the areas <spi_descript>.",
    "How would you describe the regions <spi_descript>?",
    "What do you notice in <spi_descript>?",
    "Could you summarise what the areas <spi_descript> depict?",
    "Please tell me what the regions <spi_descript> represent.",
    "Can you explain the contents of the areas <spi_descript>?",
    "Give a detailed account of the regions <spi_descript>.",
    "What information can you give me about <spi_descript>?",
    "Please describe the image parts marked <spi_descript>.",
    "What is shown in the marked areas <spi_descript>?",
    "Identify and describe the objects in <spi_descript>.",
    "Could you walk me through the regions <spi_descript>?",
    "Describe each of the following areas: <spi_descript>.",
    "What are these regions <spi_descript> about?",
    "Please provide a description for the areas <spi_descript>.",
]

#: Ask which part of an earlier description matches one region (Flickr30K; DR:72-83). 10 templates.
REGION_QUESTIONS = [
    "Which part of your overall description corresponds to the specific area of the image <spi_descript> you are referring to?",
    "Which words of your description refer to <spi_descript>?",
    "What part of your description matches <spi_descript>?",
    "In your description, what corresponds to <spi_descript>?",
    "Which phrase in your answer describes <spi_descript>?",
    "What did you call <spi_descript> in your description?",
    "Which portion of the description is about <spi_descript>?",
    "How did you describe <spi_descript> above?",
    "Point out the part of your description that refers to <spi_descript>.",
    "What in your previous description relates to <spi_descript>?",
]

#: The bare placeholder (upstream's `QUESTIONS`, DR:32-47).
QUESTIONS = [SPI]

#: Answer heads/tails of the RefCOCO-family and VG answers (uniform choice per answer).
REFCOCO_ANSWER_HEADS = ["Sure, there is a ", "OK, it is a ", "There is a ", "It is a "]
ANSWER_TAILS = [" in the region.", ".", " in this region."]
#: COCO detection answers.
COCO_DET_HEADS = ["This is a ", "It is a "]

#: First-turn preamble of the RefCOCOg / VG / Flickr30K conversations.
OVERVIEW_PREAMBLE = "The <image> provides an overview of the picture.\n"
#: First-turn preamble of RefCOCO / RefCOCO+ ("describe this one region", DR:411-416); our wording.
REFCOCO_PREAMBLE = (
    "The <image> provides an overview of the picture.\n"
    "I will point to one region; please describe the object in it in a few words."
)


def coco_det_preamble(class_names: list[str]) -> str:
    """First-turn preamble of COCO detection conversations listing every class (DR:214-218); our wording."""
    return (
        "The <image> provides an overview of the picture.\n"
        "In this conversation, answer with the category of the object in each region I point to, one region "
        "at a time. The categories are: " + ", ".join(class_names) + ".\n"
    )


def fill(template: str, descript: str) -> str:
    if SPI not in template:
        raise ValueError(f"template has no {SPI}: {template!r}")
    return template.replace(SPI, descript)
