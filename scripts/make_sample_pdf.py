"""Build docs_corpus/home-composting-field-guide.pdf, the sample corpus's multi-page PDF.

Uses pypdf alone (the standard Helvetica fonts need no embedding), so the output is small
and byte-for-byte reproducible. Each page carries its own facts, so an answer citing
"page 3" can be checked by opening page 3.

    python scripts/make_sample_pdf.py            # writes the file
    python scripts/make_sample_pdf.py --check    # exits 1 if the committed file is stale
"""

from __future__ import annotations

import io
import sys
import textwrap
from pathlib import Path

from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

OUTPUT = Path(__file__).resolve().parent.parent / "docs_corpus" / "home-composting-field-guide.pdf"
TITLE = "A Field Guide to Home Composting"

# (heading, paragraphs) per page. Written for this project; CC0.
PAGES: list[tuple[str, list[str]]] = [
    (
        "1. What goes into a compost pile",
        [
            "Composting is controlled decay: bacteria, fungi, worms and insects break garden and "
            "kitchen waste down into a dark, crumbly soil conditioner called humus.",
            "A pile needs two kinds of material. Greens are rich in nitrogen: grass clippings, fruit "
            "and vegetable scraps, coffee grounds and tea leaves. Browns are rich in carbon: dry "
            "leaves, straw, wood chips, and shredded paper or cardboard.",
            "A good rule of thumb is about 3 parts browns to 1 part greens by volume. Chop or shred "
            "large pieces: smaller pieces break down faster.",
            "Keep out meat, fish, bones, dairy products, cooking oil, pet droppings, diseased plants "
            "and weeds that have gone to seed. They attract pests, smell, or spread problems back "
            "into the garden.",
        ],
    ),
    (
        "2. Building and caring for the pile",
        [
            "Choose a level, well-drained spot in part shade. A bin or heap of about one cubic metre "
            "(roughly 3 feet by 3 feet by 3 feet) is big enough to hold the heat of decay and small "
            "enough to turn by hand.",
            "Start with a layer of coarse browns such as twigs for air flow, then alternate layers "
            "of greens and browns, finishing with browns to keep flies away.",
            "Keep the pile as moist as a wrung-out sponge. Add water to dry material as you build, "
            "and cover the pile in heavy rain.",
            "A compost pile should be turned every 2 to 3 weeks. Turning brings in the oxygen the "
            "microbes need and moves the outer material into the hot centre.",
            "An active hot pile reaches 55 to 65 degrees Celsius (130 to 150 degrees Fahrenheit) in "
            "its centre within a few days. A long compost thermometer shows when it is time to turn.",
        ],
    ),
    (
        "3. Troubleshooting",
        [
            "The pile smells of ammonia: there are too many greens. Mix in dry browns such as "
            "shredded leaves or cardboard.",
            "The pile smells of rotten eggs or is slimy: it is too wet and has run out of air. Turn "
            "it and mix in dry, coarse material.",
            "The pile does not heat up: it may be too small, too dry, or short of greens. Make it "
            "bigger, add water while turning, or add fresh grass clippings.",
            "Flies, rats or raccoons visit: food scraps are exposed or meat and dairy were added. "
            "Bury fresh scraps in the centre under a layer of browns, and use a closed bin.",
            "In winter, decay slows down or stops; it starts again by itself in spring.",
        ],
    ),
    (
        "4. Finished compost and how to use it",
        [
            "Finished compost is ready in 2 to 6 months for a hot pile that is turned regularly. A "
            "cold pile that is left alone can take 6 to 12 months or more.",
            "Finished compost is dark brown and crumbly, smells like earth, and none of the original "
            "materials can be recognised. It no longer heats up after turning.",
            "Let it cure for 2 to 4 more weeks before using it around young plants, and sift out "
            "pieces that have not broken down: they can go back into the next pile.",
            "Spread it 2 to 3 inches (5 to 8 centimetres) deep as a mulch, dig it into vegetable beds "
            "before planting, or mix it with potting soil for containers.",
        ],
    ),
]


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _font(writer: PdfWriter, name: str) -> object:
    return writer._add_object(
        DictionaryObject(
            {
                NameObject("/Type"): NameObject("/Font"),
                NameObject("/Subtype"): NameObject("/Type1"),
                NameObject("/BaseFont"): NameObject(name),
                NameObject("/Encoding"): NameObject("/WinAnsiEncoding"),
            }
        )
    )


def _page_stream(number: int, heading: str, paragraphs: list[str]) -> bytes:
    ops = ["BT", "/F2 16 Tf", "72 720 Td", f"({_escape(heading)}) Tj", "/F1 11 Tf", "15 TL", "0 -10 Td"]
    for paragraph in paragraphs:
        ops.append("T*")
        for line in textwrap.wrap(paragraph, width=82):
            ops.append(f"T* ({_escape(line)}) Tj")
    ops += ["ET", "BT", "/F1 9 Tf", "72 40 Td", f"({_escape(TITLE)} - page {number} of {len(PAGES)}) Tj", "ET"]
    return "\n".join(ops).encode("cp1252")


def build() -> bytes:
    writer = PdfWriter()
    fonts = DictionaryObject(
        {NameObject("/F1"): _font(writer, "/Helvetica"), NameObject("/F2"): _font(writer, "/Helvetica-Bold")}
    )
    for number, (heading, paragraphs) in enumerate(PAGES, start=1):
        page = writer.add_blank_page(width=612, height=792)  # US Letter
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): fonts})
        content = DecodedStreamObject()
        content.set_data(_page_stream(number, heading, paragraphs))
        page.replace_contents(content)
    writer.add_metadata({"/Title": TITLE, "/Author": "rag sample corpus (CC0)"})
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def main(argv: list[str]) -> int:
    data = build()
    if "--check" in argv:
        if OUTPUT.read_bytes() != data:
            print(f"{OUTPUT} is stale: run python scripts/make_sample_pdf.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_bytes(data)
    print(f"wrote {OUTPUT} ({len(data):,} bytes, {len(PAGES)} pages)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
