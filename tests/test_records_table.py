from __future__ import annotations

import pyarrow.parquet as pq

from qan_ray.records import write_table


def test_write_table_keeps_the_columns_of_every_row(tmp_path):
    path = write_table(tmp_path / "t.parquet", [{"a": 1}, {"a": 2, "b": "x"}, {"c": 0.5}])
    table = pq.read_table(path)
    assert table.column_names == ["a", "b", "c"]
    assert table.to_pylist() == [{"a": 1, "b": None, "c": None}, {"a": 2, "b": "x", "c": None},
                                 {"a": None, "b": None, "c": 0.5}]


def test_read_parts_reads_every_part_in_order_with_old_parts_padded_with_nulls(tmp_path):
    import pyarrow as pa
    import pytest

    from qan_ray.records import read_parts

    schema = pa.schema([("episode", pa.int64()), ("lr", pa.float64()),
                        ("obs", pa.list_(pa.float32()))])
    assert read_parts(tmp_path, schema).equals(schema.empty_table())
    # a part from before `obs` existed, with a narrower integer type, then a current one
    pq.write_table(pa.table({"episode": pa.array([0, 1], pa.int32()), "lr": [0.1, 0.2]}),
                   tmp_path / "part-c000000.parquet")
    pq.write_table(pa.table({"episode": [2], "lr": [0.3], "obs": [[1.0, 2.0]]}, schema=schema),
                   tmp_path / "part-c000001.parquet")
    (tmp_path / "part-c000002.tmp").write_bytes(b"a write under way")  # never read
    table = read_parts(tmp_path, schema)
    assert table.schema == schema
    assert table.to_pylist() == [{"episode": 0, "lr": 0.1, "obs": None},
                                 {"episode": 1, "lr": 0.2, "obs": None},
                                 {"episode": 2, "lr": 0.3, "obs": [1.0, 2.0]}]
    (tmp_path / "part-c000003.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(ValueError, match=r"part-c000003.parquet is not a readable Parquet part"):
        read_parts(tmp_path, schema)
