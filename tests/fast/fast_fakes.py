"""A deterministic stand-in for the Sampler whose accuracy depends on the context text."""


class FakeGenerator:
    """Answers each example's prompt; how well depends on the context (system prompt):

    - contains "####": the right answer, marked ("#### 42");
    - contains "carefully": right (unmarked) when the answer is even, else off by one;
    - otherwise right (unmarked) only when the answer is divisible by 3, else off by one.
    ``params`` "broken" makes every reply empty-handed. Calls are logged in ``calls``.
    """

    def __init__(self, examples):
        self.answers = {e.prompt: int(e.answer) for e in examples}
        self.calls = []

    def reply(self, params, context, prompt, sample):
        answer = self.answers[prompt]
        if params == "broken":
            return "I am not sure."
        if "####" in context:
            return f"Adding it up gives {answer}. #### {answer}"
        good = answer % 2 == 0 if "carefully" in context else answer % 3 == 0
        return f"I think it is {answer if good else answer + 1}"

    def generate_text(self, params, pairs, n=1, seed=0, temperature=None, top_p=None, top_k=None,
                      max_new_tokens=None):
        self.calls.append({"pairs": list(pairs), "n": n, "seed": seed})
        return [[self.reply(params, c, p, j) for j in range(n)] for c, p in pairs]
