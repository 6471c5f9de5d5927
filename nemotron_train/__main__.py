from nemotron_train.cli import main

if __name__ == "__main__":  # dist_checkpointing starts a multiprocessing Manager: keep the guard
    main()
