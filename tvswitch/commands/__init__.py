"""One module per CLI verb; see ``tvswitch.cli`` for the contract each module keeps."""
