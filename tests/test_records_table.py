from __future__ import annotations

import pyarrow.parquet as pq

from qan_ray.records import write_table


def test_write_table_keeps_the_columns_of_every_row(tmp_path):
    path = write_table(tmp_path / "t.parquet", [{"a": 1}, {"a": 2, "b": "x"}, {"c": 0.5}])
    table = pq.read_table(path)
    assert table.column_names == ["a", "b", "c"]
    assert table.to_pylist() == [{"a": 1, "b": None, "c": None}, {"a": 2, "b": "x", "c": None},
                                 {"a": None, "b": None, "c": 0.5}]
