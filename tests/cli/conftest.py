from task_fixtures import private_cache, task_data_dir  # noqa: F401  (fixtures; also sets HF_*_OFFLINE)
