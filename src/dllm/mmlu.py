"""MMLU's two prompt texts and Hendrycks' grouping of its 57 subjects into four categories.

Prompt styles (`--prompt-style`), for a header, k dev examples and the test question:

- "hendrycks": exactly the text of Hendrycks et al.'s evaluate.py (hendrycks/test):
  `format_subject` joins the subject's words each with a leading space, so the header reads
  "... (with answers) about  abstract algebra.\\n\\n" with two spaces after "about"; the
  question and choices are taken as they stand in the CSV.
- "lm-eval": EleutherAI lm-evaluation-harness's mmlu task: one space after "about", the
  question stripped of surrounding whitespace (its template's `question.strip()`).

Both then write "\\nA. choice" ... "\\nAnswer:" and, for a dev example, " X\\n\\n".
"""
LETTERS = "ABCD"
ANSWER_PROBE = "Answer:"
PROMPT_STYLES = ("lm-eval", "hendrycks")

# Hendrycks' categories.py: subject -> subcategory, subcategory -> category.
SUBCATEGORIES = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics",
    "business_ethics": "business", "clinical_knowledge": "health",
    "college_biology": "biology", "college_chemistry": "chemistry",
    "college_computer_science": "computer science", "college_mathematics": "math",
    "college_medicine": "health", "college_physics": "physics",
    "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering",
    "elementary_mathematics": "math", "formal_logic": "philosophy", "global_facts": "other",
    "high_school_biology": "biology", "high_school_chemistry": "chemistry",
    "high_school_computer_science": "computer science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics",
    "high_school_macroeconomics": "economics", "high_school_mathematics": "math",
    "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math",
    "high_school_us_history": "history", "high_school_world_history": "history",
    "human_aging": "health", "human_sexuality": "culture", "international_law": "law",
    "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer science", "management": "business",
    "marketing": "business", "medical_genetics": "health", "miscellaneous": "other",
    "moral_disputes": "philosophy", "moral_scenarios": "philosophy", "nutrition": "health",
    "philosophy": "philosophy", "prehistory": "history", "professional_accounting": "other",
    "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics",
    "security_studies": "politics", "sociology": "culture", "us_foreign_policy": "politics",
    "virology": "health", "world_religions": "philosophy",
}
CATEGORIES = {
    "STEM": ("physics", "chemistry", "biology", "computer science", "math", "engineering"),
    "humanities": ("history", "philosophy", "law"),
    "social sciences": ("politics", "culture", "economics", "geography", "psychology"),
    "other (business, health, misc.)": ("other", "business", "health"),
}


def category_of(subject):
    """Hendrycks' category of an MMLU subject; None for a subject outside the 57."""
    sub = SUBCATEGORIES.get(subject)
    return next((c for c, subs in CATEGORIES.items() if sub in subs), None)


def header(subject, style):
    words = subject.split("_")
    # evaluate.py: "about {}.".format(format_subject(subject)), format_subject = " a b c"
    about = " " + ("".join(" " + w for w in words) if style == "hendrycks" else " ".join(words))
    return f"The following are multiple choice questions (with answers) about{about}.\n\n"


def question_text(q, with_answer, style):
    """'question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:' and, for a dev example, ' X\\n\\n'."""
    text = q.question.strip() if style == "lm-eval" else q.question
    text += "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    text += f"\n{ANSWER_PROBE}"
    return text + f" {q.answer}\n\n" if with_answer else text


def category_scores(subjects):
    """{category: {"n", "correct", "accuracy"}} over subject records ({"n", "correct"}), as
    Hendrycks reports them (micro averages within each category); subjects outside the 57
    are left out."""
    out = {}
    for subject, record in subjects.items():
        category = category_of(subject)
        if category is None or not record.get("n"):
            continue
        c = out.setdefault(category, {"n": 0, "correct": 0})
        c["n"] += record["n"]
        c["correct"] += record["correct"]
    for c in out.values():
        c["accuracy"] = c["correct"] / c["n"]
    return {k: out[k] for k in CATEGORIES if k in out}
