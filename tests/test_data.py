"""Tests of the PAPI data layer: items, split, subjects and bad subjects files."""

import json

import numpy as np
import pytest

from palign_jax import data
from palign_jax.errors import UserInputError


def test_items_table():
  items = data.load_items()
  assert len(items.text) == 300
  assert items.text[0] == "Worry about things."
  assert data.TRAITS[items.trait[0]] == "N"
  assert np.bincount(items.trait).tolist() == [60] * 5
  assert set(items.keyed.tolist()) == {-1, 1}


def test_split_is_the_short_form_and_matches_shipped_split():
  items, split = data.load_items(), data.load_split()
  assert len(split.known) == 120 and len(split.heldout) == 180
  assert not set(split.known) & set(split.heldout)
  assert sorted(items.short_form[split.known].tolist()) == list(range(1, 121))
  assert (items.short_form[split.known] == np.arange(1, 121)).all()  # short-form order
  shipped = json.loads((data.FILES / "mpi_300_split.json").read_text())
  assert (items.number[split.known]).tolist() == shipped["train_index"]
  assert (items.number[split.heldout]).tolist() == shipped["test_index"]
  for t in range(5):  # 24 known and 36 held-out items per trait
    assert (items.trait[split.known] == t).sum() == 24
    assert (items.trait[split.heldout] == t).sum() == 36


def test_papi_subjects():
  subjects = data.load_papi_subjects()
  assert len(subjects) == 300 and subjects.answers.shape == (300, 300)
  assert subjects.answers.dtype == np.int8
  assert subjects.ids[0] == "172481"
  assert (subjects.answers == 0).sum() == 52
  assert data.known_answers(subjects).shape == (300, 120)
  assert len(data.load_descriptions()) == 300


def test_example_answers_file_loads():
  subjects = data.load_subjects_file(data.FILES.parent.parent.parent / "examples/my_answers.csv")
  assert subjects.ids == ("me",)
  known = data.known_answers(subjects)
  assert (known > 0).all()
  assert (np.delete(subjects.answers, data.load_split().known, axis=1) == 0).all()


def test_json_formats(tmp_path):
  path = tmp_path / "s.json"
  path.write_text(json.dumps({"subjects": [{"id": "a", "answers": {"1": 5, "300": 2}}]}))
  s = data.load_subjects_file(path)
  assert s.answers[0, 0] == 5 and s.answers[0, 299] == 2 and s.answers[0].sum() == 7
  papi = [dict({"case": 7}, **{f"i{j}": 3 for j in range(1, 301)})]
  path.write_text(json.dumps(papi))
  assert (data.load_subjects_file(path).answers == 3).all()


def test_subject_spec():
  subjects = data.load_papi_subjects()
  assert data.parse_subject_spec("0:3", subjects).ids == subjects.ids[:3]
  assert data.parse_subject_spec("172481", subjects).ids == ("172481",)
  with pytest.raises(UserInputError, match="unknown subject"):
    data.parse_subject_spec("nobody", subjects)
  with pytest.raises(UserInputError, match="outside"):
    data.parse_subject_spec("0:301", subjects)


WIDE_HEADER = "id," + ",".join(f"i{j}" for j in range(1, 301))


def wide_row(subject_id, value=3):
  return f"{subject_id}," + ",".join([str(value)] * 300)


@pytest.mark.parametrize("name,content,message", [
    ("empty.csv", "", "empty"),
    ("blank.json", "  \n", "empty"),
    ("missing_field.csv", "subject,item\nme,1\n", "missing field 'id'"),
    ("missing_field.json", json.dumps([{"answers": {"1": 3}}]), "missing field 'id'"),
    ("missing_item.json", json.dumps([{"case": 1, "i1": 3}]), "missing field 'i2'"),
    ("out_of_range.csv", "subject,item,answer\nme,1,7\n", "line 2: field 'answer' is '7'"),
    ("out_of_range_wide.csv", WIDE_HEADER + "\n" + wide_row("x").replace(",3", ",6", 1) + "\n",
     r"line 2 \(subject 'x'\): field 'i1' is '6', outside 0..5"),
    ("negative.json", json.dumps([{"id": "a", "answers": {"1": -1}}]), "outside 0..5"),
    ("unknown_item.csv", "subject,item,answer\nme,301,3\n", "field 'item' is '301'"),
    ("unknown_item.json", json.dumps([{"id": "a", "answers": {"999": 3}}]), "unknown item '999'"),
    ("unknown_item_wide.csv", "id,i1,i301\na,3,3\n", "unknown item 'i301'"),
    ("duplicate.csv", WIDE_HEADER + "\n" + wide_row("x") + "\n" + wide_row("x") + "\n",
     "line 3: subject id 'x' is duplicated"),
    ("duplicate.json", json.dumps([{"id": "a", "answers": {}}, {"id": "a", "answers": {}}]),
     "subject id 'a' is duplicated"),
    ("twice.csv", "subject,item,answer\nme,1,3\nme,1,4\n", "answers item 1 twice"),
    ("wrong_type.csv", "subject,item,answer\nme,1,yes\n", "field 'answer' must be an integer"),
    ("wrong_type.json", json.dumps([{"id": "a", "answers": {"1": "3.5"}}]), "must be an integer"),
    ("wrong_type_answers.json", json.dumps([{"id": "a", "answers": [3, 4]}]),
     "field 'answers' must be an object"),
    ("wrong_type_id.json", json.dumps([{"id": None, "answers": {}}]), "field 'id'"),
    ("not_a_list.json", json.dumps({"a": 1}), "expected a list"),
    ("bad.json", "{", "not valid JSON"),
    ("short_row.csv", "id,i1,i2\na,3\n", "line 2: expected 3 fields"),
])
def test_bad_subjects_files(tmp_path, name, content, message):
  path = tmp_path / name
  path.write_text(content)
  with pytest.raises(UserInputError, match=message) as info:
    data.load_subjects_file(path)
  assert name in str(info.value)  # the message names the file


def test_missing_file(tmp_path):
  with pytest.raises(UserInputError, match="no such file"):
    data.load_subjects_file(tmp_path / "nope.csv")
