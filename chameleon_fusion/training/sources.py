"""Where training data comes from: a `datasets` dataset by hub name, local script-free folder, or save_to_disk."""

from pathlib import Path


def load_table(name_or_path: str, split: str = "train"):
    """One split of a dataset, whether it was written by save_to_disk or is loadable with load_dataset."""
    import datasets

    path = Path(name_or_path)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            if split not in table:
                raise ValueError(f"split {split!r} is not in {name_or_path}; splits: {list(table)}")
            table = table[split]
        return table
    return datasets.load_dataset(name_or_path, split=split)


def require_column(table, column: str, flag: str):
    """Raise a ValueError naming the flag when the column is missing."""
    if column not in table.column_names:
        raise ValueError(f"{flag} {column!r} is not in the dataset; its columns are {table.column_names}")
