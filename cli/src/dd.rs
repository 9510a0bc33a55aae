//! `vmimg dd`: copy with dd-style operands (`if= of= bs= count= skip=`), like qemu-img dd.

use crate::size::parse_size;
use crate::{open_image_with, usage_error, CmdResult};
use clap::Args;
use vmimg::{Error, ImageOpen, OpenOptions};

#[derive(Args, Debug)]
pub struct DdArgs {
    /// Input format (probed when absent; do not probe untrusted images).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Force share: open even if another process writes the image (its content may then
    /// read inconsistently).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Operands: `if=FILE`, `of=FILE`, `bs=SIZE` (default 512), `count=N`, `skip=N`.
    #[arg(required = true)]
    operands: Vec<String>,
}

struct Operands {
    input: String,
    output: String,
    bs: u64,
    count: Option<u64>,
    skip: u64,
}

fn parse_operands(ops: &[String]) -> Result<Operands, Error> {
    let (mut input, mut output, mut bs, mut count, mut skip) = (None, None, 512u64, None, 0u64);
    for op in ops {
        let (k, v) = op
            .split_once('=')
            .ok_or_else(|| usage_error(format!("unrecognized operand {op}")))?;
        let num = || parse_size(v).map_err(usage_error);
        match k {
            "if" => input = Some(v.to_string()),
            "of" => output = Some(v.to_string()),
            "bs" => bs = num()?,
            "count" => count = Some(num()?),
            "skip" => skip = num()?,
            _ => return Err(usage_error(format!("unrecognized operand {op}"))),
        }
    }
    if bs == 0 {
        return Err(usage_error("invalid number: '0' (bs must be positive)"));
    }
    Ok(Operands {
        input: input.ok_or_else(|| usage_error("Must specify both input and output files"))?,
        output: output.ok_or_else(|| usage_error("Must specify both input and output files"))?,
        bs,
        count,
        skip,
    })
}

pub async fn run(args: DdArgs) -> CmdResult {
    let ops = parse_operands(&args.operands)?;
    let out_format = crate::create::output_format(&args.out_format)?;
    let opts = OpenOptions::new().force_share(args.force_share);
    let src = open_image_with(&ops.input, args.format.as_deref(), opts).await?;
    // As qemu-img dd counts it: `count` blocks from the start of the input, of which the
    // first `skip` are skipped.
    let in_size = src.size();
    let end = match ops.count {
        Some(c) => c.saturating_mul(ops.bs).min(in_size),
        None => in_size,
    };
    let start = ops
        .skip
        .checked_mul(ops.bs)
        .filter(|&s| s <= end)
        .ok_or_else(|| usage_error("cannot skip past the end of the input"))?;
    let len = end - start;
    crate::refuse_aliased_target(
        &ops.output,
        std::slice::from_ref(&ops.input),
        std::slice::from_ref(&src),
    )?;
    // Any output format the registry can create, as qemu-img dd.
    let plan = crate::create::plan(
        out_format,
        &[],
        crate::create::CreateArgsCommon {
            filename: &ops.output,
            size: Some(len),
            backing: None,
            backing_format: None,
            unsafe_backing: false,
        },
    )
    .await?;
    plan.create(&ops.output).await?;
    let dst = ImageOpen::path(&ops.output)
        .format(out_format)
        .writable(true)
        .open()
        .await?;
    crate::signals::track(&dst);
    let chunk = ops.bs.max(1 << 20).min(len.max(1));
    let mut buf = vec![0u8; chunk as usize];
    let mut pos = 0u64;
    while pos < len {
        crate::signals::check()?;
        let n = chunk.min(len - pos) as usize;
        let st = src.block_status(start + pos, n as u64).await?;
        let n = st.len as usize;
        if !st.zero() {
            src.read(start + pos, &mut buf[..n]).await?;
            dst.write(pos, &buf[..n]).await?;
        }
        pos += n as u64;
    }
    dst.sync().await?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands_parse_with_defaults_and_errors() {
        let o = parse_operands(&["if=a".into(), "of=b".into(), "count=3".into()]).unwrap();
        assert_eq!((o.bs, o.count, o.skip), (512, Some(3), 0));
        let o = parse_operands(&[
            "bs=1M".into(),
            "skip=2".into(),
            "if=a".into(),
            "of=b".into(),
        ])
        .unwrap();
        assert_eq!((o.bs, o.skip), (1 << 20, 2));
        assert!(parse_operands(&["if=a".into()]).is_err());
        assert!(parse_operands(&["foo=1".into(), "if=a".into(), "of=b".into()]).is_err());
        assert!(parse_operands(&["bs=0".into(), "if=a".into(), "of=b".into()]).is_err());
    }
}
