"""The README's Python API example (tests/test_api.py runs it on the embedded model)."""
from palign_jax import api

model = api.load_model("default", config="configs/quickstart.py")
people = api.align(model, "examples/my_answers.csv")  # honest PAS; method="dpo" for DPO
api.save(people, "runs/api_example/profiles")
people = api.load(model, "runs/api_example/profiles")
answers = api.answer(model, people, "examples/weekend_habits.csv")
print(answers.trait_scores())  # {trait: [profiles]}
replies = api.generate(model, [None, *people], ["How was your weekend?"])
names = ["unaligned", *(p.subject_id for p in people)]
for name, (reply,) in zip(names, replies, strict=True):
  print(f"{name}: {reply}")
