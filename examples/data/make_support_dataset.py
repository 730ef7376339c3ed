"""Writes support.jsonl: a small customer-support instruction dataset (OpenAI `messages` format).

Deterministic (fixed seed), so the committed file can be regenerated exactly:
    python examples/data/make_support_dataset.py
The answers follow the question's intent and the product/plan it names, so a
small model can learn the mapping in a few hundred steps.
"""

import json
import random
from pathlib import Path

SYSTEM = "You are the support assistant of Nimbus Drive, a cloud storage service. Answer briefly and precisely."

PLANS = {"Free": "5 GB", "Plus": "200 GB", "Pro": "2 TB", "Team": "10 TB shared"}
DEVICES = ["iPhone", "Android phone", "Windows laptop", "Mac", "web browser", "Linux desktop"]

INTENTS = {
    "reset_password": (
        ["How do I reset my password on my {device}?", "I forgot my password, I'm on a {device}. What now?",
         "Can't log in from my {device}, how do I get a new password?", "Password reset on {device}?"],
        "Open Nimbus Drive on your {device}, tap Sign in, then Forgot password. We email a reset link that is valid for 30 minutes.",
    ),
    "storage_limit": (
        ["How much storage do I get on the {plan} plan?", "What is the storage limit of {plan}?",
         "Is {plan} enough for my photos? How big is it?", "Storage quota for the {plan} plan?"],
        "The {plan} plan includes {size} of storage. You can see your usage under Settings > Storage.",
    ),
    "upgrade": (
        ["I want to upgrade from Free to {plan}.", "How do I switch my account to {plan}?",
         "Can I move to the {plan} plan today?", "Upgrade me to {plan} please, how?"],
        "Go to Settings > Plan, choose {plan} and confirm. The upgrade is immediate and you get {size} right away.",
    ),
    "cancel": (
        ["How do I cancel my {plan} subscription?", "Please cancel {plan}, I don't need it anymore.",
         "Stop my {plan} plan from renewing.", "I want to end my {plan} subscription."],
        "Go to Settings > Plan > Cancel {plan}. You keep {plan} until the end of the billing period, then move to Free (5 GB).",
    ),
    "share": (
        ["How can I share a folder from my {device}?", "Share a file with a colleague from {device}?",
         "On my {device}, how do I send someone a link to a file?", "Sharing from {device}, how does it work?"],
        "On your {device}, select the file or folder, choose Share, then Copy link or enter an email address. Links can expire after 7 days if you set it.",
    ),
    "two_factor": (
        ["How do I turn on two-factor authentication on my {device}?", "Enable 2FA from my {device}?",
         "I want a second login step on {device}.", "Where is two-factor on {device}?"],
        "On your {device}, open Settings > Security > Two-factor authentication and scan the QR code with an authenticator app. Save the backup codes.",
    ),
    "restore": (
        ["I deleted a file by mistake on my {device}, can I get it back?", "Restore a deleted folder from {device}?",
         "Where do deleted files go on {device}?", "Undo a delete on my {device}?"],
        "Deleted files stay in Trash for 30 days. On your {device}, open Trash, select the file and choose Restore.",
    ),
    "invoice": (
        ["Where can I download my {plan} invoice?", "I need a receipt for the {plan} plan.",
         "Invoice for my {plan} subscription?", "How do I get {plan} billing documents?"],
        "Invoices for {plan} are under Settings > Billing > Invoices. Each one can be downloaded as PDF.",
    ),
    "offline": (
        ["Can I use files offline on my {device}?", "Make a folder available offline on {device}?",
         "Offline access on {device}, is it possible?", "How do I keep files on my {device} without internet?"],
        "Yes. On your {device}, open the file menu and choose Make available offline. Changes sync when you are back online.",
    ),
    "delete_account": (
        ["How do I delete my account? I use the {plan} plan.", "Close my Nimbus account, I'm on {plan}.",
         "Remove my account and all data ({plan} plan).", "I want my {plan} account gone."],
        "Cancel {plan} first under Settings > Plan, then go to Settings > Account > Delete account. Your data is erased after 14 days.",
    ),
}


def rows(seed: int = 7):
    rng = random.Random(seed)
    out = []
    for intent, (questions, answer) in INTENTS.items():
        uses_plan = "{plan}" in answer
        for q in questions:
            keys = list(PLANS) if uses_plan else DEVICES
            for k in keys:
                fill = {"plan": k, "size": PLANS[k]} if uses_plan else {"device": k}
                if intent == "upgrade" and k == "Free":
                    continue
                question = q.format(**fill)
                variants = [question]
                if rng.random() < 0.5:  # people often open with a greeting; the answer does not change
                    variants.append(rng.choice(["Hi, ", "Hello! ", "Hey there, "]) + question[0].lower() + question[1:])
                for text in variants:
                    out.append({"messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": text},
                        {"role": "assistant", "content": answer.format(**fill)},
                    ]})
    rng.shuffle(out)
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("support.jsonl")
    data = rows()
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
    print(f"wrote {len(data)} rows to {path}")
