"""The ground floor: helpers every other package may import, importing nothing of lrcompress above them."""
