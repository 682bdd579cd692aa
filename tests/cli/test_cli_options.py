"""Option parsing helpers in ``convt3d_cli.options``."""

import click
import pytest

from convt3d_cli import options


@pytest.mark.parametrize("text, expected", [("2", (2, 2, 2)), ("2,2,1", (2, 2, 1)), (" 3, 1 ,2 ", (3, 1, 2))])
def test_triple_handler(text, expected):
    assert options.triple_handler(None, None, text) == expected
    assert options.triple_handler(None, None, None) is None


@pytest.mark.parametrize("text", ["2,2", "a", "", "1,2,3,4", "1.5", "2,", "2,,2", "2,x"])
def test_triple_handler_rejects(text):
    with pytest.raises(click.BadParameter):
        options.triple_handler(None, None, text)


@pytest.mark.parametrize("text, expected", [("256M", 256 * 2 ** 20), ("2G", 2 * 2 ** 30), ("1.5GiB", 3 * 2 ** 29),
                                            ("512k", 512 * 1024), ("1000", 1000), ("64MB", 64 * 2 ** 20)])
def test_parse_size(text, expected):
    assert options.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "-1G", "0", "2X", "lots"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        options.parse_size(text)


def test_merge_layer_options_precedence():
    merged = options.merge_layer_options({"stride": (3, 3, 3), "padding": None},
                                         {"stride": 2, "padding": 1, "dilation": None})
    assert merged == {"stride": (3, 3, 3), "padding": 1, "output_padding": 0, "dilation": 1, "groups": 1}
