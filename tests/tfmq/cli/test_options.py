"""Target option flags derived from the targets' options dataclasses, and how --target all routes them."""


def test_with_all_targets_an_option_goes_to_the_targets_that_take_its_value():
    from argparse import ArgumentParser

    from tfmq.cli.options import add_target_options, target_options

    ap = ArgumentParser()
    add_target_options(ap)
    for argv, owners in ((["--device", "orin-nano"], {"tensorrt"}), (["--device", "CPU"], {"openvino"}),
                         (["--precision", "bf16"], {"openvino"}), (["--precision", "f32"], {"openvino", "coreml",
                                                                                             "tensorrt"})):
        got = target_options(ap.parse_args(argv), "all")
        name = argv[0][2:]
        assert {t for t, o in got.items() if name in o} == owners, (argv, got)
    # a value no target takes goes to every target that has the option (its check says why)
    got = target_options(ap.parse_args(["--device", "xavier"]), "all")
    assert {t for t, o in got.items() if "device" in o} == {"openvino", "tensorrt"}
