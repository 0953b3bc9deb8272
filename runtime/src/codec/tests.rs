use super::*;
use crate::command::Command;
use crate::ids::{Epoch, FlowRunId, NodeId, TransitionId};
use crate::rules::Proposal;
use crate::state::{ResultRef, State, StateName};
use crate::time::Timestamp;
use proptest::prelude::*;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sample_state() -> State {
    State::named(
        StateName::Completed,
        Timestamp::from_micros(1_767_225_600_000_000),
    )
    .with_transition(TransitionId::from_bytes([0xab; 16]))
    .with_result(ResultRef::Inline(vec![1, 2, 3]))
}

fn sample_command() -> Command {
    Command::ProposeFlowRunState {
        run: FlowRunId::from_bytes([0x11; 16]),
        proposal: Proposal::from_worker(
            State::named(StateName::Running, Timestamp::from_micros(5)),
            TransitionId::from_bytes([0x22; 16]),
            Epoch::new(3),
            "n1".parse::<NodeId>().unwrap(),
        ),
    }
}

// The golden bytes pin the stored and sent encoding: a change here is a format change and
// needs a new FORMAT_VERSION with a reader for the old one.
const STATE_GOLDEN: &str = "0185a474797065a9436f6d706c65746564a46e616d65a9436f6d706c65746564a974696d657374616d70cf0006474846204000a764657461696c7381ad7472616e736974696f6e5f6964c410ababababababababababababababababa6726573756c7481a6496e6c696e65c403010203";
const COMMAND_GOLDEN: &str = "0181b350726f706f7365466c6f7752756e537461746582a372756ec41011111111111111111111111111111111a870726f706f73616c84a5737461746584a474797065a752756e6e696e67a46e616d65a752756e6e696e67a974696d657374616d7005a764657461696c7380ad7472616e736974696f6e5f6964c41022222222222222222222222222222222a565706f636803a46e6f6465a26e31";

#[test]
fn golden_state() {
    let bytes = encode(&sample_state()).unwrap();
    assert_eq!(hex(&bytes), STATE_GOLDEN);
    assert_eq!(decode::<State>(&bytes).unwrap(), sample_state());
}

#[test]
fn golden_command() {
    let bytes = encode(&sample_command()).unwrap();
    assert_eq!(hex(&bytes), COMMAND_GOLDEN);
    assert_eq!(decode::<Command>(&bytes).unwrap(), sample_command());
}

#[test]
fn versions_are_checked() {
    let mut bytes = encode(&sample_state()).unwrap();
    bytes[0] = FORMAT_VERSION + 1;
    let err = decode::<State>(&bytes).unwrap_err();
    assert!(matches!(err, DecodeError::NewerVersion { found } if found == FORMAT_VERSION + 1));
    assert!(err.to_string().contains("upgrade"));
    bytes[0] = 0;
    assert!(matches!(
        decode::<State>(&bytes),
        Err(DecodeError::OlderVersion { found: 0 })
    ));
    assert!(matches!(decode::<State>(&[]), Err(DecodeError::Empty)));
}

#[test]
fn fields_can_be_added_and_absent_optional_fields_default() {
    // A state written without optional fields still reads.
    let minimal = serde_json::json!({"type": "Running", "name": "Running", "timestamp": 7});
    let mut bytes = vec![FORMAT_VERSION];
    bytes.extend(rmp_serde::to_vec_named(&minimal).unwrap());
    let s: State = decode(&bytes).unwrap();
    assert_eq!(s.timestamp, Timestamp::from_micros(7));
    assert_eq!(s.details, Default::default());
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode::<Command>(&bytes);
        let _ = decode::<State>(&bytes);
        let _ = decode::<crate::flow_run::FlowRun>(&bytes);
        let _ = decode::<crate::event::Event>(&bytes);
    }

    #[test]
    fn decoding_mutated_records_never_panics(flip in 0usize..200, val: u8) {
        let mut bytes = encode(&sample_command()).unwrap();
        let i = flip % bytes.len();
        bytes[i] = val;
        let _ = decode::<Command>(&bytes);
    }
}
