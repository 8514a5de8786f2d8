"""convfactor.tables.format_grid: the one formatter behind every text table."""

from convfactor.tables import format_grid


def test_columns_pad_to_the_widest_cell_left_then_right_aligned():
    lines = format_grid(["layer", "MACs"], [["conv1", "13.8k"], ["fc", "64"]], left=1)
    assert lines == ["layer   MACs", "------------", "conv1  13.8k", "fc        64"]


def test_a_free_text_last_column_is_not_padded_and_the_rule_spans_its_title():
    lines = format_grid(["name", "note"], [["a", "a long note here"], ["bbb", ""]], free_last=True)
    assert lines == ["name  note", "----------", "a     a long note here", "bbb"]  # no trailing spaces


def test_without_headers_it_is_a_key_value_block():
    assert format_grid(None, [["params", "1.7k"], ["layers replaced", "1/4"]], free_last=True) == [
        "params           1.7k", "layers replaced  1/4"]


def test_no_rows_gives_the_header_and_rule():
    assert format_grid(["a", "bb"], []) == ["a  bb", "-----"]
