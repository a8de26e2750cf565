from diffattr.datasets import fetch_cifar10

fetch_cifar10(snakemake.output[0])
